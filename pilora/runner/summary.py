"""A compact table of the records under a folder (the demo's closing table; printed after every
multirun by ``hydra_setup.PrintSummary``)."""

from __future__ import annotations

import os

from .records import find_records, read_record


def summary_rows(root: str) -> list[dict]:
    rows = []
    for path in find_records([root]):
        r = read_record(path)
        if not r or r.get("status") != "complete":
            continue
        test, final = r["metrics"].get("test") or {}, r["metrics"].get("final") or {}
        metric = r.get("metric", "accuracy")
        acc = test.get(f"test_{metric}", final.get(f"eval_{metric}"))
        rows.append(
            {
                "method": r["method"],
                "task": r["task"],
                "seed": r["seed"],
                metric: acc,
                "trainable": r["params"]["trainable"],
                "adapter": r["params"]["adapter"],
                "share_%": 100 * r["params"]["share"],
                "dominant": (r.get("pilora") or {}).get("dominant_fraction"),
                "time_s": r["timing"]["total_s"],
                "path": os.path.dirname(path),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no complete records)"
    metric = [
        k
        for k in rows[0]
        if k not in {"method", "task", "seed", "trainable", "adapter", "share_%", "dominant", "time_s", "path"}
    ][0]
    # columns as wide as their longest entry (lora_matched, commonsense170k ...)
    wm = max(8, *(len(str(r["method"])) for r in rows))
    wt = max(10, *(len(str(r["task"])) for r in rows))
    head = (
        f"{'method':{wm}s} {'task':{wt}s} {'seed':>4s} {metric:>9s} {'trainable':>10s} {'adapter':>9s} "
        f"{'share %':>8s} {'dominant':>8s} {'time s':>7s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        dom = f"{r['dominant']:.3f}" if r["dominant"] is not None else "—"
        acc = f"{r[metric]:.4f}" if isinstance(r[metric], (int, float)) else "—"
        lines.append(
            f"{r['method']:{wm}s} {r['task']:{wt}s} {r['seed']:>4d} {acc:>9s} {r['trainable']:>10,d} "
            f"{r['adapter']:>9,d} {r['share_%']:>8.3f} {dom:>8s} {r['time_s']:>7.0f}"
        )
    return "\n".join(lines)
