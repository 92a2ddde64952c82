"""Training-step time and peak memory of PiLoRA, LoRA and DoRA; stage-1 overhead; merged inference.

    python -m benchmarks.step_time [--quick] [--repeats N] [--out FILE.json] [--device cpu|cuda]
                                   [--workloads W,...] [--methods M,...] [--profile WORKLOAD]
                                   [--compile BACKEND]

Everything runs in one process. Per workload, every method gets its own model and AdamW
optimizer, and the methods are timed *interleaved*: each repeat times one sample of every method,
in an order rotated from repeat to repeat, so slow drift of the machine (other jobs, thermals)
hits all methods alike. A sample is ``steps_per_sample`` consecutive training steps
(``zero_grad`` → forward → backward → ``AdamW.step``) divided by their number; the reported time
is the median over repeats after ``warmup`` discarded rounds. Ratios are to LoRA at the same rank:
the ratio of the medians, plus the quartiles of the per-repeat *paired* ratios (same repeat,
adjacent in time) as a noise band.

Workloads
    * LLaMA-7B-shaped linear layers, each one ``nn.Linear`` named ``proj`` inside a small module
      and wrapped by :func:`pilora.prepare_model`: 4096×4096 (q/k/v/o), 4096→11008 (up/gate),
      11008→4096 (down); 2048 tokens; fp32 on CPU, bf16 on CUDA. The input requires grad (a layer in
      the middle of a network must pass the gradient on), and the upstream gradient is a fixed
      tensor, so no loss computation blurs the layer's cost. "layer set" sums the three.
    * a small randomly initialised LLaMA (``LlamaForCausalLM`` from a ``LlamaConfig``), targets
      q, k, v, up, down, causal-LM loss on a batch of random token ids.
    * ``host_stack``: 80 adapted 64 × 64 layers in a chain (as many modules as the ~1 B LLaMA of
      ``gpu_llama``) on 8 tokens. Its compute is negligible, so a step's time is host work per
      module: the regime of a GPU step at 1–4 k tokens, measured on any machine.

Methods (rank 32, α = 2r, dropout 0.05 as in ``conf/method``)
    lora (stock PEFT, the baseline), lora_fused (LoRA with PiLoRA's one-``addmm`` forward,
    ``fused_forward=True``: the like-for-like reference), pilora (r=32, r'=2, a random 40 %
    dominant mask per layer), dora (PEFT ``use_dora``),
    stage1_k10 / stage1_k1 (the stage-1 LoRA with ``ImportanceAccumulator(interval=K)`` attached
    to the optimizer; timed directly where a sample spans a multiple of K steps), and
    importance_check (one ``ImportanceAccumulator.update()`` on its own): the stage-1 overhead at
    interval K, amortised, is ``t_check / (K · t_lora)``. Only when named in ``--methods``:
    lora_wide (LoRA with the fused forward at rank r + r' = 34: PiLoRA's GEMM widths without its
    partition, so PiLoRA ÷ lora_wide is what the partition costs and lora_wide ÷ lora_fused the width).
    ``--optim`` picks every method's AdamW by its ``trainer.optim`` name (default adamw_torch).

Memory
    ``peak = static + step peak``. ``static`` is the bytes of the variant's own live tensors when a
    step starts (parameters incl. the frozen base, buffers, AdamW state, the input batch; storages
    counted once). ``step peak`` is the highest number of bytes allocated above that during one
    step that starts with no gradients: on CUDA ``max_memory_allocated() − memory_allocated()``
    around the step; on CPU the running sum of the allocation/free events that
    ``torch.profiler(profile_memory=True)`` records from PyTorch's CPU allocator (gradients,
    saved activations, temporaries, optimizer scratch). Memory that libraries allocate outside
    PyTorch's allocator (oneDNN/MKL scratch) is not seen on CPU.

Host work
    per method, ``operator_profile``: the ``aten::`` operators torch.profiler records per step
    (nested ones included), the autograd nodes, the Python ``autograd.Function`` nodes and the host
    time per step (until the step returns, before any device sync: the enqueue time on a GPU). The
    counts are deterministic, so they hold on a noisy machine where step times do not.

Merged inference
    a PiLoRA model with non-zero adapters is ``merge_and_unload()``-ed; its forward time is compared
    with the base model's, and the largest difference of its output from the unmerged model's is
    reported. (That no adapter part is left after merging is a test: ``tests/test_layer.py``.)

Importance pass memory
    over the 7B-shaped layer set (one stage-1 LoRA on all three layers, random gradients), the
    peak extra bytes of one ``ImportanceAccumulator.update()`` (profiler / CUDA allocator) and, by
    wrapping ``pilora.importance._grad_chunks``, the largest ``G̃`` block and how many blocks are
    alive at once; compared with one chunk (``chunk_rows × n × 4`` bytes) and a dense ``m × n``.

This module is the command line; the pieces are in the package (see ``benchmarks/__init__.py``).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.harness import profile_breakdown, require_device
from benchmarks.importance_probe import importance_memory
from benchmarks.report import build_record, environment, format_breakdown, format_report, loadavg, write_json
from benchmarks.runner import run_workload
from benchmarks.workloads import (
    ALL_METHODS,
    BASELINE,
    CHUNK_ROWS,
    DEFAULT_OPTIM,
    DOMINANT_FRACTION,
    DROPOUT,
    K_DEFAULT,
    OPTIMIZERS,
    R_S,
    TRAIN_METHODS,
    R,
    named_workload,
    sizes,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in well under a minute on a CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default 5, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before timing (default 1)")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as torch starts)")
    p.add_argument(
        "--optim",
        choices=list(OPTIMIZERS),
        default=DEFAULT_OPTIM,
        help=f"every method's AdamW, by its trainer.optim name (default {DEFAULT_OPTIM}, as conf/trainer)",
    )
    p.add_argument(
        "--compile",
        metavar="BACKEND",
        default=None,
        help="torch.compile every method's model with this backend (inductor, aot_eager, eager)",
    )
    p.add_argument(
        "--profile",
        metavar="WORKLOAD",
        default=None,
        help="instead of the benchmark: torch.profiler per-operator breakdown of LoRA vs PiLoRA "
        "steps on one workload (layer_q, layer_up, layer_down, llama_small)",
    )
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated subset of layer_q,layer_up,layer_down,llama_small,host_stack,importance "
        "(default: all; with --quick all but host_stack, whose profiled steps take minutes on a CPU)",
    )
    p.add_argument(
        "--methods",
        default=",".join(TRAIN_METHODS),
        help=f"comma-separated subset of {','.join(ALL_METHODS)} (lora, the baseline, is always run; "
        "lora_wide, LoRA at rank r + r' with the fused forward, only when named); "
        "fewer methods leave room for more repeats",
    )
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    args.methods = tuple(m for m in ALL_METHODS if m in methods or m == BASELINE)
    if args.workloads is None:
        args.workloads = (
            "layer_q,layer_up,layer_down,llama_small" + ("" if args.quick else ",host_stack") + ",importance"
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sz = sizes(args.quick, device)
    if args.profile:
        name = args.profile
        wl = named_workload(name, sz, dtype, device)
        if wl is None:
            raise SystemExit(f"--profile: unknown workload {name!r}")
        per_op = profile_breakdown(wl, steps=args.repeats or 3, device=device)
        print(f"# per-operator breakdown, {name} {wl.meta}, {torch.get_num_threads()} threads")
        print(format_breakdown(per_op))
        if args.out:
            write_json(args.out, {"environment": environment(device, args), "workload": wl.meta, "per_op_ms": per_op})
        return {"per_op_ms": per_op}
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    t_start = time.perf_counter()
    load_start = loadavg()
    results = {}
    for name in wanted:
        wl = named_workload(name, sz, dtype, device)
        if wl is None:  # "importance" (below)
            continue
        print(f"[{time.perf_counter() - t_start:6.1f} s] {name} {wl.meta}", flush=True)
        results[name] = run_workload(
            wl, repeats, args.warmup, device, methods=args.methods, compile_backend=args.compile, optim=args.optim
        )
        del wl
        gc.collect()
    importance = None
    if "importance" in wanted:
        print(f"[{time.perf_counter() - t_start:6.1f} s] importance pass memory", flush=True)
        importance = importance_memory(
            sz["importance_layers"], dtype, device, where="quick layer set" if args.quick else "7B layer set"
        )
    config = {
        "r": R,
        "r_s": R_S,
        "dominant_fraction": DOMINANT_FRACTION,
        "alpha": 2 * R,
        "dropout": DROPOUT,
        "k_default": K_DEFAULT,
        "chunk_rows": CHUNK_ROWS,
        "repeats": repeats,
        "warmup": args.warmup,
        "methods": list(args.methods),
        "compile": args.compile,
        "quick": args.quick,
        "dtype": str(dtype).replace("torch.", ""),
        "optimizer": f"AdamW(lr=1e-4, {args.optim})",
        "sizes": sz,
        "loadavg_start": load_start,
        "wall_s": None,
    }
    config["wall_s"] = time.perf_counter() - t_start
    record = build_record(results, importance, environment(device, args), config)
    print(format_report(record))
    if args.out:
        write_json(args.out, record)
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
