"""How the benchmarks measure: interleaved timing, operator and host-time counts per step, and the
memory probe (static bytes of a variant, peak bytes allocated above the start of a call)."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable

import torch

from benchmarks.workloads import BASELINE, Variant, Workload, build_variant


def require_device(device: str) -> None:
    """Exit with code 2 when ``device`` is CUDA and none is available."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        raise SystemExit(2)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def round_order(names: list, rep: int) -> list:
    """Rotate the order each round and reverse every other round, so that neither a method's
    position in the round nor its predecessor (whose memory traffic it inherits) is fixed."""
    order = rotated(names, rep)
    return order[::-1] if rep % 2 else order


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: str,
    steps: dict[str, int] | None = None,
    checks: dict[str, Callable[[], bool]] | None = None,
    details: dict | None = None,
) -> dict[str, list[float]]:
    """Per-step seconds of every ``fn`` (the mean over a window of ``steps[name]`` consecutive
    calls), ``repeats`` windows each after ``warmup`` discarded rounds, interleaved.

    Each step is also timed on its own: if ``details`` is a dict, ``details[name]`` gets per timed
    window a list of ``(seconds, ran_check)``, where ``checks[name]()`` (called before the step)
    says whether that step runs the periodic importance check.
    """
    names = list(fns)
    samples = {n: [] for n in names}
    for rep in range(warmup + repeats):
        for n in round_order(names, rep):
            k = (steps or {}).get(n, 1)
            flag = (checks or {}).get(n)
            per = []
            for _ in range(k):
                ran = bool(flag()) if flag else False
                per.append((timed(fns[n], device), ran))
            if rep >= warmup:
                samples[n].append(sum(t for t, _ in per) / k)
                if details is not None:
                    details.setdefault(n, []).append(per)
    return samples


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def static_tensors(v: Variant) -> list[torch.Tensor]:
    out = list(v.model.parameters()) + list(v.model.buffers()) + list(v.workload.inputs)
    for module in v.model.modules():  # PiLoRA's pattern P and row indices: plain attributes, not buffers
        if hasattr(module, "derived_tensors"):
            out += module.derived_tensors()
    for state in v.optimizer.state.values():
        out += [t for t in state.values() if isinstance(t, torch.Tensor)]
    if v.accumulator is not None:
        out += v.accumulator.state_tensors()
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop log lines (fd 2) while profiling."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no real fd 2 (e.g. captured by a test runner): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_bytes(fn: Callable[[], None], device: str) -> int:
    """Peak bytes allocated above the starting level while ``fn`` runs: on CUDA from the allocator's
    peak counter, on CPU the running sum of the allocation/free events ``torch.profiler`` records from
    PyTorch's CPU allocator (memory that oneDNN/MKL allocate outside it is not seen)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def measure_memory(v: Variant, device: str) -> dict:
    """``peak = static + step peak`` of one training step that starts with no gradients."""
    v.optimizer.zero_grad(set_to_none=True)
    for t in v.workload.inputs:
        t.grad = None
    static = tensor_bytes(static_tensors(v))
    step = peak_extra_bytes(v.step, device)
    return {"static_bytes": static, "step_peak_bytes": step, "peak_bytes": static + step}


def _python_backward_names() -> set[str]:
    """Names of the backward nodes of every ``torch.autograd.Function`` defined in Python."""
    names, todo = set(), [torch.autograd.Function]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            names.add(sub.__name__ + "Backward")
            todo.append(sub)
    return names


def operator_profile(fn: Callable[[], None], device: str, calls: int = 1) -> dict:
    """Deterministic host-work measures of ``calls`` consecutive calls of ``fn``, per call:
    ``ops``: ``aten::`` operators torch.profiler records (nested ones included, so a composite op
    counts with its parts); ``autograd_nodes``: backward functions the autograd engine ran;
    ``python_functions``: ``autograd.Function`` nodes written in Python (0 is the target);
    ``host_s``: time until the calls returned, before waiting for the device (median of 3)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    python_nodes = _python_backward_names()
    ops = nodes = py = 0
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            ops += e.count
        elif e.key.startswith("autograd::engine::evaluate_function: "):
            nodes += e.count
            py += e.count if e.key.split(": ", 1)[1] in python_nodes else 0
    host = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls)
        sync(device)
    return {
        "ops": ops / calls,
        "autograd_nodes": nodes / calls,
        "python_functions": py / calls,
        "host_s": statistics.median(host),
        "calls": calls,
    }


def profile_breakdown(wl: Workload, methods=(BASELINE, "pilora"), steps: int = 3, device: str = "cpu") -> dict:
    """Self time per operator and step (ms) of each method, from ``torch.profiler`` over ``steps``
    steps after one warm-up step each, run alternately. Returns ``{op: {method: ms}}``."""
    from torch.profiler import ProfilerActivity, profile

    variants = {m: build_variant(m, wl) for m in methods}
    for v in variants.values():
        v.step()
    per_op: dict[str, dict[str, float]] = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    for _ in range(steps):
        for m, v in variants.items():
            with _quiet_stderr(), profile(activities=acts) as prof:
                v.step()
                sync(device)
            for e in prof.key_averages():
                t = e.self_device_time_total if str(device).startswith("cuda") else e.self_cpu_time_total
                per_op.setdefault(e.key, {}).setdefault(m, 0.0)
                per_op[e.key][m] += t / 1e3 / steps
    return per_op
