"""LoRA vs PiLoRA vs DoRA on a randomly initialised ~1B LLaMA, bf16, one CUDA device.

    python -m benchmarks.gpu_llama --out results/gpu_llama.json [--repeats 10] [--warmup 2]
                                   [--compile [BACKEND] [--compile-only]] [--optim adamw_torch_fused]

Same measurements and code as :mod:`benchmarks.step_time` (interleaved per-step medians over windows of
``K = 10`` steps, so ``stage1_k10`` is timed directly; peak memory from the CUDA allocator; the
stage-1 overhead at K = 1 and K = 10; merged-PiLoRA inference vs the base model; the memory of one
importance pass over the LLaMA-7B layer set), on ``LlamaForCausalLM`` with hidden 2048, 16
layers, intermediate 5504, 16 heads, vocabulary 32000 (≈ 0.94 B parameters), targets q, k, v, up,
down, 4 × 512 = 2048 tokens. Beside LoRA, fused LoRA, PiLoRA, DoRA and stage 1, ``lora_wide`` (LoRA with
the fused forward at rank ``r + r'``) is the control that splits PiLoRA's time and peak memory into
what the width costs and what the partition costs. PEFT keeps the adapters in fp32 on the bf16 base (its default
``autocast_adapter_dtype``), for every method alike. Built to finish in well under 5 minutes on
one H100/H200-class GPU. Exits with code 2 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from benchmarks.importance_probe import importance_memory
from benchmarks.report import build_record, environment, format_report, write_json
from benchmarks.runner import run_workload
from benchmarks.workloads import ALL_METHODS, DEFAULT_OPTIM, K_DEFAULT, LAYERS_7B, OPTIMIZERS, llama_workload

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_llama", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="write the JSON record here")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (each K=10 steps per method)")
    p.add_argument("--warmup", type=int, default=2, help="discarded rounds before timing")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"], help="decoder layers")
    p.add_argument(
        "--optim", choices=list(OPTIMIZERS), default=DEFAULT_OPTIM, help="every method's AdamW (trainer.optim name)"
    )
    p.add_argument("--no-importance", action="store_true", help="skip the importance-pass memory check")
    p.add_argument(
        "--compile",
        metavar="BACKEND",
        nargs="?",
        const="inductor",
        default=None,
        help="also time LoRA, LoRA fused, PiLoRA and stage 1 under torch.compile (default backend: inductor)",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="with --compile: skip the eager methods (when eager and compiled run as separate jobs)",
    )
    return p.parse_args(argv)


def run(
    args: argparse.Namespace,
    device: str = "cuda",
    dtype=torch.bfloat16,
    config: dict | None = None,
    importance_shapes: dict | None = None,
) -> dict:
    """The benchmark itself; ``main`` refuses to call it without CUDA (tests call it tiny on CPU)."""
    cfg = dict(config) if config else dict(LLAMA_1B, num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    wl = llama_workload(
        "llama_1b" if config is None else "llama_tiny",
        cfg,
        args.batch,
        args.seq,
        dtype,
        device,
        steps_per_sample=K_DEFAULT,
    )
    print(f"[{time.perf_counter() - t0:6.1f} s] built {wl.meta}", flush=True)
    optim = args.optim
    env = environment(device, args, script="benchmarks.gpu_llama")
    conf = {
        "model": cfg,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dtype": str(dtype).replace("torch.", ""),
        "k_default": K_DEFAULT,
        "compile": args.compile,
        "optim": optim,
    }

    def save(results: dict, importance=None, final: bool = False) -> dict:
        # written after every part, so a run stopped at a time limit keeps what it measured
        conf["wall_s"], conf["complete"] = time.perf_counter() - t0, final
        if device.startswith("cuda"):
            conf["max_memory_allocated_total"] = torch.cuda.max_memory_allocated()
        record = build_record(results, importance, env, conf)
        write_json(args.out, record)
        return record

    results = {}
    if not (args.compile and args.compile_only):
        results[wl.name] = run_workload(
            wl, args.repeats, args.warmup, device, methods=ALL_METHODS, optim=optim
        )  # lora_wide: the width control
        partial = save(results)
        if args.compile:
            print(format_report(partial), flush=True)  # the eager table, before the (long) compiled part
    if args.compile:
        print(f"[{time.perf_counter() - t0:6.1f} s] compiled ({args.compile})", flush=True)
        results[wl.name + "_compiled"] = run_workload(
            wl,
            args.repeats,
            args.warmup,
            device,
            methods=("lora", "lora_fused", "pilora", "stage1_k10"),
            merged=False,
            compile_backend=args.compile,
            optim=optim,
        )
        save(results)
    del wl
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    importance = None
    if not args.no_importance:
        print(f"[{time.perf_counter() - t0:6.1f} s] importance pass memory", flush=True)
        importance = importance_memory(importance_shapes or LAYERS_7B, dtype, device)
    record = save(results, importance, final=True)
    print(format_report(record))
    print(f"wrote {args.out}")
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks.gpu_llama needs a CUDA device and none is available "
            "(torch.cuda.is_available() is False); on a CPU run `python -m benchmarks.step_time` instead.",
            file=sys.stderr,
        )
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
