"""Peak memory of one training step per method, in a GPU run's precision, on any device.

    python -m benchmarks.memory_proxy [--quick] [--batch 8] [--seq 256] [--dtype bf16|fp32] [--out FILE.json]

On a GPU the base model is bf16 and PEFT keeps the adapters in fp32 (``autocast_adapter_dtype``), so
what PiLoRA adds over LoRA (its stored ``m × (r + r')`` B with the structural zeros, the pattern
``P``, the width ``r + r'`` of the activations it saves) is a different share of the peak than in
the CPU benchmark's fp32. This builds ``llama_small`` (:mod:`benchmarks.workloads`) in that dtype and
measures ``peak = static + step peak`` (:func:`benchmarks.harness.measure_memory`) for LoRA, LoRA
at width ``r + r'``, PiLoRA as the trainer runs it (the step mask) and PiLoRA with the per-forward
product. Memory only: the profiler's allocator events are deterministic, so one step per method is
the measurement (bf16 matmuls on a CPU are slow; 8 × 256 tokens take a few minutes).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import measure_memory, require_device
from benchmarks.report import publish
from benchmarks.workloads import LLAMA_QUICK, LLAMA_SMALL, build_variant, llama_workload, random_masks

METHODS = ("lora", "lora_wide", "pilora", "pilora_product")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run(batch: int = 8, seq: int = 256, dtype: str = "bf16", device: str = "cpu", config: dict | None = None) -> dict:
    wl = llama_workload("llama_small", config or LLAMA_SMALL, batch, seq, DTYPES[dtype], device, steps_per_sample=1)
    masks = random_masks(wl.reference, wl.targets)
    out = {"workload": wl.meta, "memory": {}}
    for m in METHODS:
        pilora = m.startswith("pilora")
        v = build_variant("pilora" if pilora else m, wl, masks=masks if pilora else None)
        if m == "pilora_product":
            v.use_layer_product()
        v.step()  # AdamW state exists, as in every later step
        out["memory"][m] = measure_memory(v, device)
        del v
    base = out["memory"]["lora"]["peak_bytes"]
    for mem in out["memory"].values():
        mem["ratio"] = mem["peak_bytes"] / base
    return out


def format_table(res: dict) -> str:
    w = res["workload"]
    lines = [
        f"# peak memory of one step, LLaMA hidden {w['hidden_size']} × {w['num_hidden_layers']} layers, "
        f"{w['batch']} × {w['seq']} tokens, {w['dtype']} base",
        f"{'method':<15} {'peak MiB':>9} {'×LoRA':>7} {'static MiB':>11} {'step MiB':>9}",
    ]
    for m, mem in res["memory"].items():
        lines.append(
            f"{m:<15} {mem['peak_bytes'] / 2**20:>9.1f} {mem['ratio']:>7.4f} "
            f"{mem['static_bytes'] / 2**20:>11.1f} {mem['step_peak_bytes'] / 2**20:>9.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_proxy", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny LLaMA of step_time --quick (else llama_small)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the base model's dtype")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    require_device(args.device)
    res = run(args.batch, args.seq, args.dtype, args.device, LLAMA_QUICK if args.quick else None)
    return publish(res, args, "benchmarks.memory_proxy", format_table(res))


if __name__ == "__main__":
    main()
