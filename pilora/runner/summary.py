"""A compact table of the records under a folder (the demo's closing table; printed after every
multirun by ``hydra_setup.PrintSummary``), one row per job: its method, task, seed, the values of
the sweep's other swept keys (``point``: ``supplementary_r=2``) and its folder, so that the six
rows of an r' x seed sweep can be told apart and found."""

from __future__ import annotations

import os

from .records import find_records, is_rescoring, read_record

_FIXED = ("method", "task", "seed", "trainable", "adapter", "share_%", "dominant", "time_s", "point", "folder", "path")
# swept keys the table shows in columns of their own (method, task, seed) or not at all (model: one per table)
_IN_COLUMNS = ("method", "task", "model", "seed")


def swept_keys(overrides, params=None) -> list[str]:
    """The keys a multirun sweeps: the command-line overrides Hydra expands (``r=1,2``,
    ``range(...)``, ``choice(...)``) and the keys of ``hydra.sweeper.params``, sorted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides or []))
    return sorted({o.key_or_group for o in parsed if o.is_sweep_override()} | set(params or {}))


def _value(config: dict, key: str):
    """``method.supplementary_r`` / ``method/partition`` (a group: its ``name``) in a record's config;
    None when the job's config lacks it (a key its method does not use)."""
    node = config
    for part in key.lstrip("+~").replace("/", ".").split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node.get("name") if isinstance(node, dict) else node


def point_text(config: dict, swept) -> str:
    """``supplementary_r=2 r=8``: the record's value of every swept key outside the table's columns."""
    parts = []
    for key in swept or ():
        if key.lstrip("+~") in _IN_COLUMNS:
            continue
        value = _value(config, key)
        parts.append(f"{key.lstrip('+~').replace('/', '.').split('.')[-1]}={'—' if value is None else value}")
    return " ".join(parts)


def summary_rows(root: str, swept=()) -> list[dict]:
    """One row per complete record under ``root``; ``swept``: the sweep's swept keys (``point``)."""
    rows = []
    for path in find_records([root]):
        r = read_record(path)
        if not r or r.get("status") != "complete" or is_rescoring(r):
            continue
        test, final = r["metrics"].get("test") or {}, r["metrics"].get("final") or {}
        metric = r.get("metric", "accuracy")
        acc = test.get(f"test_{metric}", final.get(f"eval_{metric}"))
        headline = ((r.get("evaluation") or {}).get("headline") or {}).get("metric")
        if headline in test:  # the number the tables report (commonsense: test_avg_accuracy, not the loss)
            metric, acc = headline.removeprefix("test_"), test[headline]
        folder = os.path.dirname(path)
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
                "point": point_text(r.get("config") or {}, swept),
                "folder": os.path.relpath(folder, root) if folder != os.path.abspath(root) else ".",
                "path": folder,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no complete records)"
    # each row's headline (GLUE accuracy, commonsense avg_accuracy, ...): one sweep may mix tasks
    names = [next((k for k in r if k not in _FIXED), None) for r in rows]
    metric = names[0] if len(set(names)) == 1 else "score"
    scores = [
        (f"{r[n]:.4f}" if isinstance(r.get(n), (int, float)) else "—") + (f" {n}" if metric == "score" and n else "")
        for r, n in zip(rows, names)
    ]
    ws = max(9, len(metric), *(len(c) for c in scores))
    # columns as wide as their longest entry (lora_matched, commonsense170k ...)
    wm = max(8, *(len(str(r["method"])) for r in rows))
    wt = max(10, *(len(str(r["task"])) for r in rows))
    points = [r.get("point") or "" for r in rows]
    folders = [str(r.get("folder") or r.get("path") or "") for r in rows]
    wp = max(len(p) for p in points) and max(5, *(len(p) for p in points))
    wf = max(6, *(len(f) for f in folders))
    point_head = f" {'point':{wp}s}" if wp else ""
    head = (
        f"{'method':{wm}s} {'task':{wt}s} {'seed':>4s}{point_head} {metric:>{ws}s} {'trainable':>10s} {'adapter':>9s} "
        f"{'share %':>8s} {'dominant':>8s} {'time s':>7s} {'folder':{wf}s}"
    )
    lines = [head, "-" * len(head)]
    for r, point, folder, acc in zip(rows, points, folders, scores):
        dom = f"{r['dominant']:.3f}" if r["dominant"] is not None else "—"
        point_cell = f" {point:{wp}s}" if wp else ""
        lines.append(
            f"{r['method']:{wm}s} {r['task']:{wt}s} {r['seed']:>4d}{point_cell} {acc:>{ws}s} {r['trainable']:>10,d} "
            f"{r['adapter']:>9,d} {r['share_%']:>8.3f} {dom:>8s} {r['time_s']:>7.0f} {folder:{wf}s}"
        )
    return "\n".join(lines)
