"""The performance targets and their PASS/MISS verdicts from a benchmark record."""

from __future__ import annotations

from benchmarks.stats import paired_quantiles
from benchmarks.workloads import BASELINE, LIKE_FOR_LIKE

TARGETS = {  # name: (threshold, description); PASS means value <= threshold
    "stage2_time": (1.00, "PiLoRA stage-2 step time ≤ 1.00× LoRA"),
    "stage2_time_fused": (1.00, "(like for like) PiLoRA ≤ 1.00× LoRA, both fused forward"),
    "stage2_memory": (1.00, "PiLoRA stage-2 peak memory ≤ LoRA's"),
    "stage1_overhead": (0.05, "stage-1 overhead ≤ 5 % at the default K"),
    "importance_check": (0.10, "one importance check ≤ 0.10× a LoRA step (≤ 1 % of stage 1 at K = 10)"),
    "importance_one_chunk": (1, "importance pass never holds more than one chunk of G̃"),
    "stage2_ops": (1.10, "PiLoRA operators per step ≤ 1.1× LoRA's (host work)"),
    "stage2_time_model": (1.03, "PiLoRA ≤ 1.03× LoRA on the LLaMA workload"),
}


def paired_time_ratio(time: dict, method: str, baseline: str = BASELINE) -> tuple[float, str]:
    """``method`` ÷ ``baseline`` as the time targets judge it: the median of the same-round ratios
    where both have per-round samples (rounds are interleaved, so this cancels the machine's drift
    between rounds, which the ratio of the two medians does not), else the ratio of the medians.
    Returns the value and how to show it."""
    a, b = time[method], time[baseline]
    medians = a["median_s"] / b["median_s"]
    q = paired_quantiles(a.get("samples_s") or [], b.get("samples_s") or [])
    if not q:
        return medians, f"{medians:.3f}×"
    return q["median"], f"{q['median']:.3f}× paired (q25–q75 {q['q25']:.3f}–{q['q75']:.3f}; medians {medians:.3f}×)"


def evaluate_targets(record: dict) -> list[dict]:
    """PASS/MISS per target and per place it is measured. Never raises on a miss."""
    rows = []

    def add(target, where, value, shown):
        thr = TARGETS[target][0]
        rows.append(
            {
                "target": target,
                "description": TARGETS[target][1],
                "where": where,
                "value": value,
                "shown": shown,
                "threshold": thr,
                "pass": value is not None and value <= thr,
            }
        )

    places = dict(record.get("workloads", {}))
    if record.get("layer_set"):
        places["layer set"] = record["layer_set"]
    for where, w in places.items():
        t = w.get("time", {})
        if "pilora" in t:
            add("stage2_time", where, *paired_time_ratio(t, "pilora"))
            if str(w.get("name", where)).startswith("llama"):
                add("stage2_time_model", where, *paired_time_ratio(t, "pilora"))
            if LIKE_FOR_LIKE in t:
                add("stage2_time_fused", where, *paired_time_ratio(t, "pilora", LIKE_FOR_LIKE))
        if "pilora" in w.get("ops", {}):
            o = w["ops"]["pilora"]
            add(
                "stage2_ops",
                where,
                o["ratio"],
                f"{o['ratio']:.3f}× ({o['ops']:.0f} vs {w['ops'][BASELINE]['ops']:.0f})",
            )
        mem = w.get("memory", {})
        if "pilora" in mem:
            r = mem["pilora"]["ratio"] if "ratio" in mem["pilora"] else w["memory_ratios"]["pilora"]["peak"]
            add("stage2_memory", where, r, f"{r:.3f}×")
        s1 = w.get("stage1", {})
        if s1.get("default_k") is not None:
            add("stage1_overhead", where, s1["default_k"], f"{100 * s1['default_k']:+.2f} % ({s1['default_k_source']})")
        if s1.get("k1_amortised") is not None:  # one timed check ÷ one LoRA step
            add("importance_check", where, s1["k1_amortised"], f"{s1['k1_amortised']:.3f}× a LoRA step")
    imp = record.get("importance_memory")
    if imp:
        add(
            "importance_one_chunk",
            imp.get("where", "7B layer set"),
            imp["max_live_blocks"],
            f"{imp['max_live_blocks']} blocks alive at once; peak extra "
            f"{imp['peak_extra_bytes'] / imp['chunk_bytes']:.2f}× one chunk, "
            f"{imp['peak_extra_bytes'] / imp['dense_bytes']:.3f}× dense m×n",
        )
        if imp["max_block_elems"] > imp["chunk_bound_elems"]:  # a block larger than a chunk: a miss
            rows[-1]["pass"] = False
    return rows
