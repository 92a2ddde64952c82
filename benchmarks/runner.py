"""One workload, every method: interleaved step times, memory, host work per step, merged inference."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from benchmarks.harness import measure_memory, operator_profile, time_interleaved
from benchmarks.stats import memory_ratios, ratio_summary, robust_step_time, stage1_overheads
from benchmarks.workloads import (
    BASELINE,
    DEFAULT_OPTIM,
    K_DEFAULT,
    TRAIN_METHODS,
    Workload,
    build_variant,
    method_config,
    random_masks,
)


def run_workload(
    wl: Workload,
    repeats: int,
    warmup: int,
    device: str,
    log=print,
    methods=TRAIN_METHODS,
    merged: bool = True,
    compile_backend: str | None = None,
    optim: str = DEFAULT_OPTIM,
) -> dict:
    """Every method on ``wl``: interleaved step times (``repeats`` rounds after ``warmup``), memory,
    operators and host time per step, parameter counts, the stage-1 overhead and, with ``merged``,
    the merged PiLoRA model's inference time."""
    k = wl.steps_per_sample
    methods = [m for m in methods if not (m == "stage1_k10" and k % K_DEFAULT)]  # needs whole windows
    masks = random_masks(wl.reference if wl.reference is not None else wl.make_base(False), wl.targets)
    variants = {
        m: build_variant(m, wl, masks=masks if m == "pilora" else None, compile_backend=compile_backend, optim=optim)
        for m in methods
    }
    fns = {m: v.step for m, v in variants.items()}
    if "stage1_k1" in variants:
        fns["importance_check"] = variants["stage1_k1"].accumulator.update  # grads of its last step
    steps = {m: (1 if m == "importance_check" else k) for m in fns}
    # the check needs the stage-1 model's gradients: give it one step before the timing starts
    if "stage1_k1" in variants:
        variants["stage1_k1"].step()
    t0 = time.perf_counter()
    checks = {
        m: (lambda acc=v.accumulator: acc.steps_seen % acc.interval == 0)
        for m, v in variants.items()
        if v.accumulator is not None
    }
    details: dict = {}
    samples = time_interleaved(fns, repeats, warmup, device, steps, checks, details)
    log(f"  {wl.name}: timed {len(fns)} methods × {warmup}+{repeats} rounds in {time.perf_counter() - t0:.1f} s")
    summary = ratio_summary(samples, robust={m: robust_step_time(w) for m, w in details.items()})
    memory = {m: measure_memory(v, device) for m, v in variants.items()}
    # host work per step (a whole window, so a stage-1 window holds its check); the check alone
    ops = {m: operator_profile(fns[m], device, steps[m]) for m in fns}
    for m, o in ops.items():
        o["ratio"] = o["ops"] / ops[BASELINE]["ops"]
        o["host_ratio"] = o["host_s"] / ops[BASELINE]["host_s"]
    out = {
        "name": wl.name,
        "kind": wl.kind,
        "meta": wl.meta,
        "steps_per_sample": k,
        "adapter_params": {m: v.adapter_params() for m, v in variants.items()},
        "stored_params": {m: v.stored_params() for m, v in variants.items()},
        "ops": ops,
        "time": summary,
        "memory": memory,
        "memory_ratios": memory_ratios(memory),
        "stage1": stage1_overheads(summary),
    }
    for m, r in out["memory_ratios"].items():
        out["memory"][m]["ratio"] = r["peak"]
    del variants, fns
    gc.collect()
    if merged and "pilora" in methods:
        out["merged_inference"] = merged_inference(wl, masks, repeats, warmup, device)
    return out


def merged_inference(wl: Workload, masks: dict, repeats: int, warmup: int, device: str) -> dict:
    """Forward time of a merged PiLoRA model (non-zero B blocks, ``merge_and_unload()``) against the
    base model's, and how far the merged output is from the unmerged one and from the base model's.
    That nothing of the adapter is left after merging is tested in ``tests/test_layer.py``."""
    from pilora import prepare_model
    from pilora.peft_layers import lora_layers

    reference = wl.make_base(False).eval()
    model = prepare_model(wl.make_base(True), method_config("pilora", wl.targets), masks=masks)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: non-zero B blocks
        for layer in lora_layers(model).values():
            B = layer.lora_B["default"]
            B.set_blocks(*(0.01 * torch.randn(t.shape, generator=g).to(t) for t in (B.dominant, B.supplementary)))
    model.eval()
    with torch.inference_mode():
        before = wl.forward(model).float()
    merged = model.merge_and_unload()
    merged.eval()
    with torch.inference_mode():
        after = wl.forward(merged).float()
        base_out = wl.forward(reference).float()
        diff = (after - before).abs().max().item()
        scale = before.abs().max().item()
        changed = (after - base_out).abs().max().item()

        def fwd(m):
            return lambda: wl.forward(m)

        samples = time_interleaved({"base": fwd(reference), "merged": fwd(merged)}, repeats, warmup, device)
    out = {
        "base_s": statistics.median(samples["base"]),
        "merged_s": statistics.median(samples["merged"]),
        "samples_s": samples,
        "max_abs_diff_vs_unmerged": diff,
        "output_scale": scale,
        "max_abs_change_vs_base": changed,
    }
    out["ratio"] = out["merged_s"] / out["base_s"]
    del merged, model, reference
    gc.collect()
    return out
