"""Tables 1-4 of the paper from run records, ours beside the published numbers.

    python -m analysis.tables                        # outputs/ + multirun/, all four tables, Markdown
    python -m analysis.tables --root multirun/table2_glue --table 2 --which final
    python -m analysis.tables --latex --table 1 3
    python -m analysis.tables --no-cost              # without the cost table
    python -m analysis.tables --wandb me/pilora      # records from a W&B project (cached locally)
    python -m analysis.tables --wandb-dir multirun   # records from offline W&B run folders

What a cell shows, which records sit in which row, when a cell is bold and how the cost table is
computed: ``docs/tables.md``. The pieces: :mod:`analysis.table_model` (numbers, rows, tables),
this module (records -> rows), :mod:`analysis.best_cells`, :mod:`analysis.table_text` (Markdown,
LaTeX) and :mod:`analysis.cost_table`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import pandas as pd

from .best_cells import clear_winner, mark_best  # noqa: F401
from .cost_table import build_cost, cost_latex, cost_markdown  # noqa: F401
from .keys import at_default, partition_label
from .records import add_source_args, load_records, load_source  # noqa: F401
from .rows import say
from .table_model import (  # noqa: F401 (PAPER_FILE, Stat: used by callers)
    DASH,
    KEY_NAMES,
    METHOD_ORDER,
    MODEL_NAMES,
    OTHER_BASIS,
    PAPER_FILE,
    PARAMS_BASES,
    TABLE_IDS,
    Row,
    Stat,
    Table,
    load_paper,
    method_name,
    mismatched_keys,
    same_value,
)
from .table_text import cell_texts, notes, source_text, to_latex, to_markdown  # noqa: F401
from .wandb_source import WandbSourceError, load_wandb  # noqa: F401


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _key_name(k: str) -> str:
    if k in KEY_NAMES:
        return KEY_NAMES[k]
    if k.startswith("method.partition.args."):
        return {"tau": "τ"}.get(k.rsplit(".", 1)[1], k.rsplit(".", 1)[1])
    return k


def _partition_id(name, args) -> str:
    args = {k: v for k, v in (args or {}).items() if k != "seed"}
    return "partition:" + json.dumps(
        [name, {k: float(v) if isinstance(v, (int, float)) else v for k, v in sorted(args.items())}]
    )


def _row_id(rec: pd.Series, row_key: str) -> str:
    if row_key == "partition" and rec["method"] != "lora_matched":
        return _partition_id(rec["partition"], rec["partition_args"])
    return rec["method"]


def _paper_row_id(prow: dict, row_key: str) -> str | None:
    if row_key == "partition":
        p = prow.get("partition")
        return _partition_id(p["name"], p.get("args")) if p else None
    return prow.get("method_config")


def _varying_keys(configs: dict[str, dict], cells: dict[str, set]) -> dict[str, set[str]]:
    """Per cell: the keys whose values differ between its configurations. Not differences of their
    own: α where it follows r (one α/r in every configuration: α = 2r, or α = r), and a key every
    configuration holds at its unset default (:func:`~analysis.keys.at_default`: stage-1 r = r)."""
    varying: dict[str, set[str]] = {}
    for t, cks in cells.items():
        varying[t] = set()
        for k in set().union(*(configs[c].keys() for c in cks)):
            vals = [configs[c].get(k, "<absent>") for c in cks]
            if any(not same_value(v, vals[0]) for v in vals[1:]):
                varying[t].add(k)
    anywhere = set().union(*varying.values())
    explained = {k for k in anywhere if all(at_default(c, k) for c in configs.values())}
    if {"method.alpha", "method.r"} <= anywhere:
        ratios = {
            round(c["method.alpha"] / c["method.r"], 9)
            for c in configs.values()
            if isinstance(c.get("method.alpha"), (int, float)) and c.get("method.r")
        }
        if len(ratios) == 1:
            explained.add("method.alpha")
    return {t: keys - explained for t, keys in varying.items()}


_LABEL_ORDER = [
    "method.r",
    "method.alpha",
    "method.supplementary_r",
    "method.supplementary_alpha",
    "method.partition.name",
]


def _label(config: dict, keys) -> str:
    def order(k):
        if k in _LABEL_ORDER:
            return (_LABEL_ORDER.index(k), k)
        return (len(_LABEL_ORDER) + (0 if k.startswith("method.partition.args.") else 1), k)

    return ", ".join(f"{_key_name(k)}={_fmt_value(config[k])}" for k in sorted(keys, key=order) if k in config)


def _dev_field(rec: pd.Series, field_name: str) -> str:
    """The column holding a record's number for a table field. A GLUE column reads the dev set after
    an epoch (``<which>_eval_<metric>``); a run that selected on a train holdout
    (``task.selection_split=train_holdout``) holds the holdout in ``eval_*`` and scored the dev set
    once, as ``test_<metric>`` (its headline says so)."""
    if rec.get("headline_from") == "test" and field_name.startswith(("best_eval_", "final_eval_")):
        return "test_" + field_name.split("_eval_", 1)[1]
    return field_name


def _cell_stat(recs: pd.DataFrame, field_name: str) -> Stat | None:
    values = []
    for _, rec in recs.sort_values("seed").iterrows() if not recs.empty else []:
        v = rec.get(_dev_field(rec, field_name))
        if v is not None and not pd.isna(v):
            values.append((100.0 * float(v), rec["seed"]))
    if not values:
        return None
    return Stat([v for v, _ in values], [s for _, s in values])


def _avg_stat(cells: dict) -> Stat | None:
    """Mean over the columns when every column has a value; per-seed means (with std) when
    every column has the same seeds, else one pooled mean."""
    stats = list(cells.values())
    if not stats or any(s is None for s in stats):
        return None
    seeds = [tuple(s.seeds) for s in stats]
    if len(set(seeds)) == 1 and len(seeds[0]) == stats[0].n and len(set(seeds[0])) == stats[0].n:
        per_seed = [statistics.fmean(s.values[i] for s in stats) for i in range(stats[0].n)]
        return Stat(per_seed, list(seeds[0]))
    ns = [s.n for s in stats]
    return Stat([statistics.fmean(s.mean for s in stats)], [], per_column_n=(min(ns), max(ns)))


def build_table(
    df: pd.DataFrame, table_id: str, which: str = "best", paper: dict | None = None, params_basis: str = "adapter_share"
) -> Table:
    """Rows of one table (paper rows first, per model section, then our extra rows)."""
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', not {which!r}")
    paper = paper or load_paper()
    spec = paper["tables"][str(table_id)]
    row_key = spec.get("row_key", "method")
    cols = spec["columns"]
    fields = {c["key"]: c["field"].format(which=which) for c in cols}
    tasks = {c["task"] for c in cols}
    per_task = set(spec.get("per_task_keys") or ())
    per_task_ref = {c["task"]: (spec.get("reference_per_task") or {}).get(c["key"]) for c in cols}
    sub = df[df["task"].isin(tasks)] if not df.empty else df
    if row_key == "partition" and not sub.empty:  # PiLoRA's partitions, and LoRA at their budgets
        sub = sub[sub["method"].isin(["pilora", "lora_matched"])]
    sub = sub.copy()
    if not sub.empty:
        sub["_row_id"] = [_row_id(r, row_key) for _, r in sub.iterrows()]

    paper_rows = [
        Row(
            model=p["model"] + (" †" if p.get("dagger") and p["method"] == DASH else ""),
            method=p["method"] + (" †" if p.get("dagger") and p["method"] != DASH else ""),
            paper=p,
            model_config=p.get("model_config"),
            row_id=_paper_row_id(p, row_key),
        )
        for p in spec["rows"]
    ]
    extra: dict[str, list[Row]] = {}
    for (model, rid), grp in sub.groupby(["model", "_row_id"], sort=False) if not sub.empty else []:
        configs = {ck: g.iloc[0]["config"] for ck, g in grp.groupby("config_key")}
        cells = {t: set(g["config_key"]) for t, g in grp.groupby("task")}
        varying = _varying_keys(configs, cells)
        # what tells a cell's configurations apart names them in every column (r' = 0 and r' = 1 on
        # one task, r' = 1 alone on another: one row r' = 1), except a key the paper sets per task
        # (Tab. 6: each GLUE task its own learning rate and epochs): that names a configuration only
        # where it differs inside its own cell, so one task's stray run splits no other task's row
        across = set().union(*varying.values()) - per_task
        model_ref = (spec.get("reference") or {}).get(model) or {}
        target = next((r for r in paper_rows if r.model_config == model and r.row_id == rid), None)
        labels, on_paper = {}, set()
        for t, cks in cells.items():
            keys = across | varying[t]
            # the paper's setting in this column: the model's, and where the paper gives each task its
            # own value (Tab. 6's CoLA lr 2e-4, RTE 50 epochs), this task's
            ref = {**model_ref, **(per_task_ref.get(t) or {})} if model_ref else {}
            for ck in cks:
                conf = configs[ck]
                mismatch = mismatched_keys(ref, conf)
                # Table 4: a budget-matched LoRA always names the partition its ranks came from
                own = (
                    {k for k in conf if k.startswith("method.partition.")}
                    if (row_key == "partition" and rid == "lora_matched")
                    else set()
                )
                labels[ck] = _label(conf, keys | set(mismatch) | own)
                # on the paper's row: agrees with the paper's setting on every key it has, and a key
                # that names it here and the paper does not set holds nothing but its unset default
                # (a cumulative threshold moves a run off the row; stage-1 r null, = r, does not)
                if target is not None and not mismatch and all(k in ref or at_default(conf, k) for k in keys):
                    on_paper.add(ck)
        # a label must not be shared by two configurations of one cell
        for t, cks in cells.items():
            seen: dict[str, list] = {}
            for ck in cks:
                seen.setdefault(labels[ck], []).append(ck)
            for lab, same in seen.items():
                if len(same) > 1:
                    for ck in same:
                        labels[ck] = (lab + ", " if lab else "") + f"config {ck}"
        by_label: dict[tuple, list[str]] = {}
        for ck in configs:  # the paper's configurations make one row whatever their labels say in their own cells
            by_label.setdefault((True, "") if ck in on_paper else (False, labels[ck]), []).append(ck)
        for (is_paper, lab), cks in by_label.items():
            recs = grp[grp["config_key"].isin(cks)]
            if is_paper:
                row = target
            else:
                if row_key == "partition" and rid != "lora_matched":
                    first = recs.iloc[0]
                    name = partition_label(first["partition"], first["partition_args"]) or "?"
                else:
                    name = method_name(rid)
                row = Row(
                    model=MODEL_NAMES.get(model, model),
                    method=name + (f" ({lab})" if lab else ""),
                    model_config=model,
                    row_id=rid,
                    label=lab,
                )
                extra.setdefault(model, []).append(row)
            row.cells = {c["key"]: _cell_stat(recs[recs["task"] == c["task"]], fields[c["key"]]) for c in cols}
            row.avg = _avg_stat(row.cells)
            row.params = [100.0 * float(v) for v in recs[params_basis].dropna()]
            other = OTHER_BASIS[params_basis]  # both bases printed
            row.params_other = [100.0 * float(v) for v in recs[other].dropna()] if other in recs.columns else []
            if "budget_residual_share" in recs.columns:
                row.residual = [100.0 * float(v) for v in recs["budget_residual_share"].dropna()]
            row.records = recs.drop(columns=["_row_id"])
            row.groups = [
                (t, ck, sorted(g["seed"]), list(g["path"])) for (t, ck), g in recs.groupby(["task", "config_key"])
            ]
    # order: each paper section followed by our extra rows of that model; other models last
    rows: list[Row] = []
    for i, r in enumerate(paper_rows):
        rows.append(r)
        last_of_section = i + 1 == len(paper_rows) or paper_rows[i + 1].model_config != r.model_config
        if last_of_section and r.model_config in extra:
            rows += _sorted_extra(extra.pop(r.model_config))
    for model in sorted(extra):
        rows += _sorted_extra(extra[model])
    for r in rows:
        if not r.cells:
            r.cells = {c["key"]: None for c in cols}
    mark_best(rows, [c["key"] for c in cols])
    return Table(str(table_id), spec, rows, which, params_basis, len(sub))


def _sorted_extra(rows: list[Row]) -> list[Row]:
    def key(r):
        rid = r.row_id or ""
        return (METHOD_ORDER.index(rid) if rid in METHOD_ORDER else len(METHOD_ORDER), rid, r.label)

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- rendering


def table_frame(table: Table) -> pd.DataFrame:
    """The numbers of a table as a long DataFrame (one row per table row × column), for notebooks."""
    out = []
    for r in table.rows:
        p = r.paper or {}
        for c in table.columns + [{"key": "avg", "label": table.spec.get("avg_label", "Avg.")}]:
            s = r.avg if c["key"] == "avg" else r.cells.get(c["key"])
            paper_v = p.get("avg") if c["key"] == "avg" else (p.get("values") or {}).get(c["key"])
            out.append(
                {
                    "model": r.model,
                    "method": r.method,
                    "column": c["label"],
                    "ours_mean": s.mean if s else None,
                    "ours_std": s.std if s else None,
                    "n": s.n if s else 0,
                    "best": c["key"] in r.best,
                    "paper": paper_v,
                }
            )
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- cost


def render(
    df: pd.DataFrame,
    tables=TABLE_IDS,
    which: str = "best",
    latex: bool = False,
    params_basis: str = "adapter_share",
    verbose: bool = False,
    paper: dict | None = None,
    cost: bool = True,
) -> str:
    """The tables (Markdown or LaTeX), followed by the cost table unless ``cost=False`` and, for
    records read by :func:`~analysis.records.load_source`, by its notes on them (records left out,
    revisions mixed: :func:`~analysis.records.source_notes`)."""
    paper = paper or load_paper()
    fn = to_latex if latex else to_markdown
    built = [build_table(df, t, which, paper, params_basis) for t in tables]
    parts = [fn(t, verbose) for t in built]
    if cost:
        parts.append((cost_latex if latex else cost_markdown)(built))
    on_records = source_text(df.attrs.get("notes") or [], latex)  # what loading them said on stderr
    return "\n".join(parts + ([on_records] if on_records else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tables 1-4: our records beside the paper's numbers.")
    add_source_args(p)
    p.add_argument("--table", nargs="+", choices=TABLE_IDS, default=list(TABLE_IDS))
    p.add_argument(
        "--which",
        choices=["best", "final"],
        default="best",
        help="GLUE: validation accuracy of the best or the last epoch (default best)",
    )
    p.add_argument("--latex", action="store_true", help="LaTeX instead of Markdown")
    p.add_argument("--params-basis", choices=sorted(PARAMS_BASES), default="adapter_share")
    p.add_argument("--verbose", action="store_true", help="list the configurations and folders behind each row")
    p.add_argument("--no-cost", action="store_true", help="leave out the cost table (wall time, GPU-hours, memory)")
    p.add_argument("--out", help="also write the output to this file")
    args = p.parse_args(argv)
    try:
        df = load_source(args)
    except WandbSourceError as err:
        say(f"error: {err}")
        return 2
    if df.empty:
        say("showing the paper's numbers only (ours: —)")
    text = render(df, args.table, args.which, args.latex, args.params_basis, args.verbose, cost=not args.no_cost)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
