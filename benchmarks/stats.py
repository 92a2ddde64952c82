"""The statistics of the benchmark samples: medians and their ratios to the baseline, paired
per-round ratios, spike-robust step times, the stage-1 overhead, memory ratios, the layer set."""

from __future__ import annotations

import statistics

from benchmarks.workloads import BASELINE, K_DEFAULT


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    if len(xs) == 1:
        return {"q25": xs[0], "median": xs[0], "q75": xs[0]}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"q25": q[0], "median": statistics.median(xs), "q75": q[2]}


def paired_quantiles(xs: list[float], ys: list[float]) -> dict:
    """Quartiles of the same-round ratios ``xs[i] / ys[i]`` ({} unless both have the same rounds)."""
    if not xs or len(xs) != len(ys):
        return {}
    return quantiles([x / y for x, y in zip(xs, ys)])


def robust_step_time(windows: list[list[tuple[float, bool]]]) -> float:
    """A spike-robust per-step time from individually timed steps: the median of the ordinary
    steps plus the share of check steps times their median extra cost. For a method without a
    periodic check this is the median step; with the check every K-th step it is
    ``median(plain) + (median(check) − median(plain)) / K``; with K = 1 it is ``median(check)``."""
    plain = [t for w in windows for t, ran in w if not ran]
    check = [t for w in windows for t, ran in w if ran]
    if not plain:
        return statistics.median(check)
    base = statistics.median(plain)
    if not check:
        return base
    return base + (statistics.median(check) - base) * len(check) / (len(check) + len(plain))


def ratio_summary(
    samples: dict[str, list[float]], baseline: str = BASELINE, robust: dict[str, float] | None = None
) -> dict[str, dict]:
    """Median per method and its ratio to the baseline's median, plus paired per-repeat ratios.

    ``samples[method][i]`` is repeat ``i``'s per-step time; repeat ``i`` of two methods ran
    back to back, so ``samples[m][i] / samples[baseline][i]`` is a paired ratio.
    """
    base = samples[baseline]
    base_med = statistics.median(base)
    out = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        out[name] = {
            "median_s": med,
            "ratio": med / base_med,
            "samples_s": list(xs),
            "paired_ratio": paired_quantiles(xs, base),
        }
        if robust and name in robust and baseline in robust:
            out[name]["robust_s"] = robust[name]
            out[name]["robust_ratio"] = robust[name] / robust[baseline]
    return out


def stage1_overheads(time_summary: dict[str, dict], k_default: int = K_DEFAULT) -> dict:
    """Stage-1 overhead vs plain LoRA: direct (timed with the hook attached; from the window means
    and, spike-robust, from the individually timed steps) and amortised from one timed check."""
    t_lora = time_summary[BASELINE]["median_s"]
    out = {}
    for name in ("stage1_k10", "stage1_k1"):
        if name in time_summary:
            out[f"{name}_direct"] = time_summary[name]["median_s"] / t_lora - 1.0
            if "robust_ratio" in time_summary[name]:
                out[f"{name}_robust"] = time_summary[name]["robust_ratio"] - 1.0
    if "importance_check" in time_summary:
        t_check = time_summary["importance_check"]["median_s"]
        out["check_s"] = t_check
        out["k1_amortised"] = t_check / t_lora
        out[f"k{k_default}_amortised"] = t_check / (k_default * t_lora)
    # the figure the target is judged on: a direct measurement at K where one exists (the
    # spike-robust one first), else the amortised one
    for key, source in (
        (f"stage1_k{k_default}_robust", "direct, robust"),
        (f"stage1_k{k_default}_direct", "direct"),
        (f"k{k_default}_amortised", "amortised"),
    ):
        if key in out:
            out["default_k"], out["default_k_source"] = out[key], source
            break
    else:
        out["default_k"], out["default_k_source"] = None, None
    return out


def memory_ratios(memory: dict[str, dict], baseline: str = BASELINE) -> dict[str, dict]:
    b = memory[baseline]
    return {
        n: {
            "peak": m["peak_bytes"] / b["peak_bytes"],
            "step_peak": m["step_peak_bytes"] / b["step_peak_bytes"] if b["step_peak_bytes"] else None,
        }
        for n, m in memory.items()
    }


def layer_set_summary(workloads: dict[str, dict]) -> dict | None:
    """Sum the per-layer medians (and peaks) over the layer workloads: the mix of a LLaMA block."""
    layers = [w for w in workloads.values() if w.get("kind") == "layer"]
    if len(layers) < 2:
        return None
    methods = [m for m in layers[0]["time"] if all(m in w["time"] for w in layers)]
    time_sum = {m: sum(w["time"][m]["median_s"] for w in layers) for m in methods}
    out = {
        "layers": [w["name"] for w in layers],
        "time": {m: {"median_s": t, "ratio": t / time_sum[BASELINE]} for m, t in time_sum.items()},
    }
    mem_methods = [m for m in layers[0].get("memory", {}) if all(m in w.get("memory", {}) for w in layers)]
    if BASELINE in mem_methods:
        peaks = {m: sum(w["memory"][m]["peak_bytes"] for w in layers) for m in mem_methods}
        out["memory"] = {m: {"peak_bytes": p, "ratio": p / peaks[BASELINE]} for m, p in peaks.items()}
    if all("stage1" in w and "check_s" in w["stage1"] for w in layers):
        t_check = sum(w["stage1"]["check_s"] for w in layers)
        out["stage1"] = {
            "check_s": t_check,
            "k1_amortised": t_check / time_sum[BASELINE],
            f"k{K_DEFAULT}_amortised": t_check / (K_DEFAULT * time_sum[BASELINE]),
        }
        out["stage1"]["default_k"] = out["stage1"][f"k{K_DEFAULT}_amortised"]
        out["stage1"]["default_k_source"] = "amortised"
    return out
