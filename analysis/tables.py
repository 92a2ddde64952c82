"""Tables 1-4 of the paper from run records, ours beside the published numbers.

    python -m analysis.tables                        # outputs/ + multirun/, all four tables, Markdown
    python -m analysis.tables --root multirun/table2_glue --table 2 --which final
    python -m analysis.tables --latex --table 1 3
    python -m analysis.tables --no-cost              # without the cost table
    python -m analysis.tables --wandb me/pilora      # records from a W&B project (cached locally)
    python -m analysis.tables --wandb-dir multirun   # records from offline W&B run folders

Every cell reads ``ours / paper``. *Ours* is the mean over seeds of one configuration with the
sample standard deviation and the number of seeds (``81.20 ± 0.31 (n=3)``; one seed:
``81.20 (n=1)``, no spread), and ``—`` when no run exists. *Paper* is the number printed in the
paper (``analysis/paper_numbers.json``, the only place these numbers live) or ``—``. No number is
ever made up: an average is only shown when every column has a value; when the columns' seeds
differ it is the mean of the column means, shown as ``80.10 (n=2–3 per column)`` with no spread.

Best cells (the no-win-within-spread rule). Within one model's rows, in each column (and the
average), the highest of *our* means is marked bold (Markdown ``**…**``, LaTeX ``\\textbf``) only
when it is a clear win: both it and the runner-up have at least two seeds, and it beats the
runner-up's mean by more than the sum of the two standard deviations (their mean ± std intervals
do not overlap). A single seed, a pooled average or a margin within the spread is never marked,
and the paper's numbers are never marked. See :func:`clear_winner`.

Honest comparisons. ``method=lora_matched`` runs LoRA with PiLoRA's trainable-parameter budget
(per-module ranks from PiLoRA's partition); its row reads ``LoRA (budget-matched)`` followed by
``[residual +0.31%]``: its adapter parameters minus PiLoRA's, in % of PiLoRA's
(``budget_match.residual_share`` of the records, a range when it differs between tasks). Table 4
also shows the budget-matched LoRA rows, labelled with the partition their ranks came from.

Cost table (after the accuracy tables; ``--no-cost`` leaves it out): one row per table row with
records, from the records' ``timing`` (``total_s`` counts every stage of the job: PiLoRA's stage 1,
training, the final evaluation), ``device``, ``n_gpus`` and ``peak_memory_mb``:

* ``Wall time (h)`` = Σ ``total_s`` / 3600 over the row's jobs (all tasks and seeds), ``Stage 1
  (h)`` the part of it spent in stage 1 (a job that reused another job's stage 1 through
  ``method.importance_from`` did not pay for it; the cell says how many did);
* ``GPU-h`` = Σ ``total_s`` × GPUs / 3600 over the jobs that ran on a GPU (GPUs = the record's
  ``n_gpus``, else its ``world_size`` (DDP processes, one GPU each), else 1, said in the notes; a
  single process driving several GPUs through DataParallel records world_size 1 and is
  undercounted); jobs with ``device == "cpu"`` are summed separately
  and shown as ``… CPU-h`` (wall-clock hours of a CPU job, not core-hours);
* ``Peak memory (GB)`` = the largest ``peak_memory_mb`` / 1024 of the row's jobs (GPU: peak
  allocated by torch on the recording process's GPU; CPU: the process's peak resident memory).

Which records sit in which row (the grouping rule):

* A table's records are those of its columns' tasks (Table 4: PiLoRA runs only). A row is a
  (model, method) pair -- Table 4: a (model, partition strategy) pair.
* Records are averaged over seeds only within one configuration (``config_key``, see
  :mod:`analysis.records`: everything but seed and bookkeeping). If a cell holds several
  configurations (e.g. PiLoRA with r' = 0 and r' = 1 on the same task), the keys in which they
  differ become part of the row label (``PiLoRA (r'=0)``, ``PiLoRA (r'=1)``) and each
  configuration gets its own row, aligned across the columns by that label.
* A configuration sits on the paper's row when its model is the paper's model for that row and
  it agrees with the paper's setting (``reference`` in ``paper_numbers.json``: r, r', partition,
  learning rate where one value holds for the whole table) on every key it has. Other
  configurations are extra rows, labelled with what differs, with ``—`` for the paper.
* ``# Params (%)`` is ``100 × adapter parameters / all parameters`` (``adapter_share``) from the
  records, a ``min–max`` range when it differs between the row's tasks.
* GLUE columns use the validation accuracy of the best epoch (``--which final``: the last);
  vision columns the test-split accuracy; commonsense columns each test set's accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

import pandas as pd

from .records import WandbSourceError, add_source_args, load_records, load_source, load_wandb, partition_label, say  # noqa: F401

PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_numbers.json")
TABLE_IDS = ("1", "2", "3", "4")
METHOD_NAMES = {
    "lora": "LoRA",
    "lora_matched": "LoRA (budget-matched)",
    "rslora": "rsLoRA",
    "dora": "DoRA",
    "pissa": "PiSSA",
    "milora": "MiLoRA",
    "lora_dash": "LoRA-Dash",
    "full": "Full FT",
    "pilora": "PiLoRA",
}
METHOD_ORDER = ["full", "lora", "lora_matched", "rslora", "dora", "pissa", "milora", "lora_dash", "pilora"]
MODEL_NAMES = {
    "llama2-7b": "LLaMA2-7B",
    "llama3-8b": "LLaMA3-8B",
    "roberta-large": "RoBERTa-large",
    "clip-vit-b32": "CLIP ViT-B/32",
}
KEY_NAMES = {
    "method.r": "r",
    "method.supplementary_r": "r'",
    "method.alpha": "α",
    "method.supplementary_alpha": "α'",
    "method.partition.name": "partition",
    "method.stage1_r": "stage-1 r",
    "method.importance_interval": "K",
    "method.stage1.max_steps": "stage-1 steps",
    "method.stage1.epochs": "stage-1 epochs",
    "trainer.learning_rate": "lr",
    "trainer.num_train_epochs": "epochs",
    "trainer.max_steps": "max_steps",
    "trainer.per_device_train_batch_size": "batch",
}
DASH = "—"


def load_paper(path: str = PAPER_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- data


@dataclass
class Stat:
    """Values (percent) of one cell, one per seed."""

    values: list[float]
    seeds: list = field(default_factory=list)
    per_column_n: tuple | None = None  # set for a pooled average: (fewest, most) seeds of a column

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; ``None`` for one seed or a pooled average."""
        return statistics.stdev(self.values) if self.n > 1 and self.per_column_n is None else None

    def fmt(self, d: int) -> str:
        if self.per_column_n is not None:
            lo, hi = self.per_column_n
            return f"{self.mean:.{d}f} (n={lo if lo == hi else f'{lo}–{hi}'} per column)"
        if self.n > 1:
            return f"{self.mean:.{d}f} ± {self.std:.{d}f} (n={self.n})"
        return f"{self.mean:.{d}f} (n=1)"


def clear_winner(stats: list) -> int | None:
    """Index (into ``stats``) of the cell to mark as best, or ``None``: the no-win-within-spread rule.

    Among the cells with a value (``Stat``; ``None`` = no run) the one with the highest mean wins
    only if it and the runner-up both have a spread (at least two seeds, not a pooled average)
    and ``best.mean − runner_up.mean > best.std + runner_up.std``. Fewer than two cells: no mark.
    """
    have = sorted(((i, s) for i, s in enumerate(stats) if s is not None), key=lambda t: t[1].mean, reverse=True)
    if len(have) < 2:
        return None
    (i, best), (_, second) = have[0], have[1]
    if best.std is None or second.std is None:
        return None
    return i if best.mean - second.mean > best.std + second.std else None


@dataclass
class Row:
    model: str  # display name
    method: str  # display label
    paper: dict | None = None  # the paper's row, if this row is one
    model_config: str | None = None
    row_id: str | None = None
    label: str = ""  # what distinguishes this configuration (extra rows)
    cells: dict = field(default_factory=dict)  # column key -> Stat | None
    avg: Stat | None = None
    params: list = field(default_factory=list)  # ours, percent, one per record
    groups: list = field(default_factory=list)  # (task, config_key, seeds, paths)
    residual: list = field(default_factory=list)  # budget-matched LoRA: residual share (%), one per record
    records: pd.DataFrame | None = None  # the row's records (cost table)
    best: set = field(default_factory=set)  # column keys (and "avg") marked as a clear win

    @property
    def has_ours(self) -> bool:
        return any(v is not None for v in self.cells.values())


@dataclass
class Table:
    id: str
    spec: dict
    rows: list
    which: str
    params_basis: str
    n_records: int

    @property
    def columns(self) -> list[dict]:
        return self.spec["columns"]

    @property
    def decimals(self) -> int:
        return int(self.spec.get("decimals", 2))


# ----------------------------------------------------------------------------- building


def _eq(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


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


def _varying_keys(configs: dict[str, dict], cells: dict[str, set]) -> list[str]:
    """Keys whose values differ between configurations that share a cell."""
    varying: set[str] = set()
    for cks in cells.values():
        if len(cks) < 2:
            continue
        keys = set().union(*(configs[c].keys() for c in cks))
        for k in keys:
            vals = [configs[c].get(k, "<absent>") for c in cks]
            if any(not _eq(v, vals[0]) for v in vals[1:]):
                varying.add(k)
    # α follows r (α = 2r, or α = r): not a separate difference when the ratio is constant
    if "method.alpha" in varying and "method.r" in varying:
        ratios = {
            round(c["method.alpha"] / c["method.r"], 9)
            for c in configs.values()
            if isinstance(c.get("method.alpha"), (int, float)) and c.get("method.r")
        }
        if len(ratios) == 1:
            varying.discard("method.alpha")
    return sorted(varying)


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


def _cell_stat(recs: pd.DataFrame, field_name: str) -> Stat | None:
    if field_name not in recs.columns:
        return None
    ok = recs[recs[field_name].notna()]
    if ok.empty:
        return None
    ok = ok.sort_values("seed")
    return Stat([100.0 * float(v) for v in ok[field_name]], list(ok["seed"]))


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
        ref = (spec.get("reference") or {}).get(model) or {}
        target = next((r for r in paper_rows if r.model_config == model and r.row_id == rid), None)
        labels, on_paper = {}, set()
        for ck, conf in configs.items():
            mismatch = [k for k in ref if k in conf and not _eq(conf[k], ref[k])]
            # Table 4: a budget-matched LoRA always names the partition its ranks came from
            own = (
                {k for k in conf if k.startswith("method.partition.")}
                if (row_key == "partition" and rid == "lora_matched")
                else set()
            )
            labels[ck] = _label(conf, set(varying) | set(mismatch) | own)
            # on the paper's row: agrees with the paper's setting on every key it has, and has no
            # value for a varying key the paper does not set (e.g. a cumulative threshold)
            if target is not None and not mismatch and not any(k in conf for k in varying if k not in ref):
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
        for ck in configs:
            by_label.setdefault((ck in on_paper, labels[ck]), []).append(ck)
        for (is_paper, lab), cks in by_label.items():
            recs = grp[grp["config_key"].isin(cks)]
            if is_paper:
                row = target
            else:
                if row_key == "partition" and rid != "lora_matched":
                    first = recs.iloc[0]
                    name = partition_label(first["partition"], first["partition_args"]) or "?"
                else:
                    name = METHOD_NAMES.get(rid, rid)
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


def mark_best(rows: list[Row], keys: list[str]) -> None:
    """Set ``row.best`` by :func:`clear_winner`, per column and the average, within each model's rows."""
    sections: dict[str, list[Row]] = {}
    for r in rows:
        r.best = set()
        sections.setdefault(r.model_config or r.model, []).append(r)
    for section in sections.values():
        for key in keys + ["avg"]:
            stats = [r.avg if key == "avg" else r.cells.get(key) for r in section]
            win = clear_winner(stats)
            if win is not None:
                section[win].best.add(key)


def _sorted_extra(rows: list[Row]) -> list[Row]:
    def key(r):
        rid = r.row_id or ""
        return (METHOD_ORDER.index(rid) if rid in METHOD_ORDER else len(METHOD_ORDER), rid, r.label)

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- rendering


def _params_text(row: Row) -> str:
    if not row.params:
        return DASH
    lo, hi = min(row.params), max(row.params)
    if round(lo, 2) == round(hi, 2):
        return f"{statistics.fmean(row.params):.2f}"
    return f"{lo:.2f}–{hi:.2f}"


def _paper_text(v, d: int) -> str:
    if v is None:
        return DASH
    return f"{v:.{d}f}"


def _pct(v: float) -> str:
    return f"{v:+.2f}%"


def residual_text(row: Row) -> str | None:
    """``+0.31%`` (or a ``min to max`` range): the budget-matched LoRA's adapter parameters minus
    PiLoRA's, in % of PiLoRA's; ``None`` for other rows."""
    if not row.residual:
        return None
    lo, hi = min(row.residual), max(row.residual)
    return _pct(lo) if _pct(lo) == _pct(hi) else f"{_pct(lo)} to {_pct(hi)}"


def cell_texts(table: Table, row: Row) -> list[str]:
    """The texts of one row: model, method, # params, one per column, average. A clear win
    (:func:`clear_winner`) is wrapped in ``**…**``."""
    d = table.decimals
    p = row.paper or {}
    pp = p.get("params_pct")
    paper_params = DASH if pp is None else f"{pp:g}" if pp == 100 else f"{pp:.2f}"
    res = residual_text(row)
    out = [row.model, row.method + (f" [residual {res}]" if res else ""), f"{_params_text(row)} / {paper_params}"]

    def ours(key, s):
        if s is None:
            return DASH
        return f"**{s.fmt(d)}**" if key in row.best else s.fmt(d)

    for c in table.columns:
        s = row.cells.get(c["key"])
        out.append(f"{ours(c['key'], s)} / {_paper_text((p.get('values') or {}).get(c['key']), d)}")
    out.append(f"{ours('avg', row.avg)} / {_paper_text(p.get('avg'), d)}")
    return out


def header(table: Table) -> list[str]:
    avg = table.spec.get("avg_label", "Avg.")
    return ["Model", "Method", "# Params (%)"] + [c["label"] for c in table.columns] + [avg]


def notes(table: Table, verbose: bool = False) -> list[str]:
    spec = table.spec
    lines = [
        f"Each cell: ours / paper. Ours: mean ± sample std over seeds (n = number of seeds; n=1: "
        f"one seed, no spread), {DASH} = no run. Score: {spec.get('metric', 'accuracy (%)')}"
        + (f"; GLUE columns at the {table.which} epoch" if "{which}" in json.dumps(spec["columns"]) else "")
        + "."
    ]
    lines.append(
        "Bold: the best of our means in a column within one model, marked only when it beats the "
        "runner-up by more than the sum of their standard deviations (both with n ≥ 2); "
        "differences within the spread are not wins."
    )
    basis = {
        "adapter_share": "100 × adapter / all parameters",
        "adapter_share_of_backbone": "100 × adapter / backbone parameters",
    }.get(table.params_basis, table.params_basis)
    lines.append(f"# Params (%): ours = {basis} from the records; paper as printed.")
    lines += list(spec.get("notes") or [])
    if table.which == "best" and "{which}" in json.dumps(spec["columns"]):
        lines.append(
            f"Best epoch: chosen on {spec.get('best_epoch_on', 'the validation split')}"
            + (
                ", the same data the columns report: an optimistic choice (--which final: the last epoch)."
                if spec.get("best_epoch_on_reported", False)
                else "."
            )
        )
    if any(r.row_id == "pilora" for r in table.rows):
        lines.append(stage1_note(table))
    if spec.get("dagger_sources"):
        lines.append(
            "† reported in "
            + "; ".join(spec["dagger_sources"])
            + ", copied by the paper"
            + (" (per-row source: analysis/paper_numbers.json)." if len(spec["dagger_sources"]) > 1 else ".")
        )
    if any(r.residual for r in table.rows):
        lines.append(
            "LoRA (budget-matched): LoRA with per-module ranks from PiLoRA's partition, matching "
            "PiLoRA's trainable-parameter count; residual = its adapter parameters minus PiLoRA's, "
            "in % of PiLoRA's."
        )
    if any(r.paper is None for r in table.rows):
        lines.append(
            "Rows without a paper number are configurations the paper does not report "
            "(other model, method or setting; the label says what differs)."
        )
    if table.n_records == 0:
        lines.append("No records for this table: only the paper's numbers are shown.")
    if verbose:
        for r in table.rows:
            for t, ck, seeds, paths in r.groups:
                lines.append(
                    f"  {r.model} / {r.method}: {t} config {ck} seeds {seeds}: "
                    + ", ".join(os.path.dirname(p) for p in paths)
                )
    return lines


def _stage1_length(config: dict) -> str:
    """How long a record's stage 1 was, from its flattened config."""
    if config.get("method.importance_from"):
        return "reused from another run"
    steps = config.get("method.stage1.max_steps")
    if steps is not None and int(steps) > 0:
        return f"{int(steps)} steps"
    epochs = config.get("method.stage1.epochs", 1)
    return f"{epochs:g} epoch" + ("" if float(epochs) == 1 else "s")


def stage1_note(table: Table) -> str:
    """PiLoRA's extra training, said in the accuracy table and not only in the cost table."""
    seen = sorted(
        {
            _stage1_length(c)
            for r in table.rows
            if r.row_id in ("pilora", "lora_matched") and r.records is not None
            for c in r.records["config"]
        }
    )
    ours = f" (our records: {', '.join(seen)})" if seen else ""
    return (
        "Training length: PiLoRA first trains a plain LoRA for its stage 1 (the paper: 1 epoch), "
        "discards it and then trains the rows' epochs; the other rows train the epochs alone. "
        f"LoRA (budget-matched) runs the same stage 1 unless it reused PiLoRA's{ours}. "
        "The cost table counts it."
    )


def to_markdown(table: Table, verbose: bool = False) -> str:
    head = header(table)
    lines = [
        f"### {table.spec['title']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in table.rows:
        lines.append("| " + " | ".join(cell_texts(table, r)) + " |")
    lines.append("")
    lines += [f"{n}  " if not n.startswith("  ") else n for n in notes(table, verbose)]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    bold = s.startswith("**") and "** / " in s
    if bold:  # a clear win: "**ours** / paper"
        head, _, tail = s[2:].partition("** / ")
        return r"\textbf{" + _tex(head) + "} / " + _tex(tail)
    s = (
        s.replace("\\", r"\textbackslash{}")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("#", r"\#")
    )
    return (
        s.replace(" ± ", r"$\pm$")
        .replace("±", r"$\pm$")
        .replace(DASH, "---")
        .replace(" †", r"$^\dagger$")
        .replace("–", "--")
        .replace("α", r"$\alpha$")
        .replace("τ", r"$\tau$")
        .replace("×", r"$\times$")
        .replace("≥", r"$\geq$")
        .replace("Σ", r"$\Sigma$")
    )


def to_latex(table: Table, verbose: bool = False) -> str:
    head = header(table)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\scriptsize",
        r"\caption{" + _tex(table.spec["title"]) + r" (ours / paper)}",
        r"\begin{tabular}{ll" + "r" * (len(head) - 2) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in head) + r" \\",
        r"\midrule",
    ]
    prev = None
    for r in table.rows:
        if prev is not None and r.model != prev:
            lines.append(r"\midrule")
        prev = r.model
        lines.append(" & ".join(_tex(t) for t in cell_texts(table, r)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += ["% " + n for n in notes(table, verbose)]
    return "\n".join(lines) + "\n"


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


@dataclass
class CostRow:
    """What the runs behind one table row cost (see the module docstring for the formulas)."""

    table: str
    model: str
    method: str
    jobs: int
    tasks: int
    seeds: list
    devices: list  # "NVIDIA H100 80GB HBM3", "2× …", "cpu"
    wall_h: float | None  # Σ total_s / 3600 over the timed jobs (None: none has a time)
    stage1_h: float | None  # Σ stage1_s / 3600 (None: no job has a stage 1)
    stage1_reused: int  # jobs that reused another job's stage 1 (method.importance_from)
    gpu_h: float | None  # Σ total_s × GPUs / 3600 over the timed GPU jobs (None: no GPU job)
    cpu_h: float | None  # Σ total_s / 3600 over the timed CPU jobs (None: no CPU job)
    peak_gb: float | None  # max peak_memory_mb / 1024
    untimed: int = 0  # jobs without timing.total_s
    gpus_assumed: int = 0  # GPU jobs whose record has neither n_gpus nor world_size (counted as 1)
    unknown_device: int = 0  # jobs whose record names no device (in no GPU-h / CPU-h sum)


def _col(recs: pd.DataFrame, name: str) -> pd.Series:
    if name in recs.columns:
        return pd.to_numeric(recs[name], errors="coerce")
    return pd.Series(float("nan"), index=recs.index, dtype=float)


def build_cost(table: Table) -> list[CostRow]:
    """One :class:`CostRow` per row of ``table`` that has records."""
    out = []
    for r in table.rows:
        recs = r.records
        if recs is None or recs.empty:
            continue
        total, stage1 = _col(recs, "time_total_s"), _col(recs, "time_stage1_s")
        dev = recs["device"] if "device" in recs.columns else pd.Series(None, index=recs.index, dtype=object)
        known = dev.notna()
        cpu = known & (dev.astype(str).str.lower() == "cpu")
        gpu = known & ~cpu
        n_gpus = _col(recs, "n_gpus")
        gpus = n_gpus.fillna(1.0)
        timed = total.notna()
        devices = sorted({(f"{int(g)}× {d}" if g > 1 else str(d)) for d, g, k in zip(dev, gpus, gpu | cpu) if k})
        out.append(
            CostRow(
                table=table.id,
                model=r.model,
                method=r.method,
                jobs=len(recs),
                tasks=recs["task"].nunique(),
                seeds=sorted(set(int(v) for v in recs["seed"])),
                devices=devices,
                wall_h=float(total[timed].sum()) / 3600 if timed.any() else None,
                stage1_h=float(stage1.dropna().sum()) / 3600 if stage1.notna().any() else None,
                stage1_reused=int((stage1.notna() & recs["importance_from"].notna()).sum()),
                gpu_h=float((total * gpus)[gpu & timed].sum()) / 3600 if gpu.any() else None,
                cpu_h=float(total[cpu & timed].sum()) / 3600 if cpu.any() else None,
                peak_gb=float(_col(recs, "peak_memory_mb").max()) / 1024
                if _col(recs, "peak_memory_mb").notna().any()
                else None,
                untimed=int((~timed).sum()),
                gpus_assumed=int((gpu & n_gpus.isna()).sum()),
                unknown_device=int((~known).sum()),
            )
        )
    return out


def hours_text(v: float | None) -> str:
    """Hours as printed in the cost table: 2 decimals, 2 significant digits below 0.01 h."""
    if v is None:
        return DASH
    if v == 0 or v >= 0.01:
        return f"{v:.2f}"
    return f"{v:.2g}"


COST_HEADER = [
    "Table",
    "Model",
    "Method",
    "Jobs",
    "Device",
    "Wall time (h)",
    "Stage 1 (h)",
    "GPU-h",
    "Peak memory (GB)",
]


def cost_texts(c: CostRow) -> list[str]:
    tasks = f"{c.tasks} task{'s' if c.tasks != 1 else ''}"
    seeds = ",".join(str(s) for s in c.seeds)
    jobs = (
        f"{c.jobs} ({tasks} × {len(c.seeds)} seeds)"
        if c.jobs == c.tasks * len(c.seeds) and len(c.seeds) > 1
        else f"{c.jobs} ({tasks}, seed{'s' if len(c.seeds) != 1 else ''} {seeds})"
    )
    stage1 = hours_text(c.stage1_h) + (f" ({c.stage1_reused} reused)" if c.stage1_reused else "")
    compute = [hours_text(c.gpu_h)] if c.gpu_h is not None else []
    if c.cpu_h is not None:
        compute.append(f"{hours_text(c.cpu_h)} CPU-h")
    return [
        f"Table {c.table}",
        c.model,
        c.method,
        jobs,
        ", ".join(c.devices) or DASH,
        hours_text(c.wall_h),
        stage1,
        " + ".join(compute) or DASH,
        DASH if c.peak_gb is None else f"{c.peak_gb:.2f}",
    ]


def cost_notes(rows: list[CostRow]) -> list[str]:
    lines = [
        "Wall time: Σ over the row's jobs of timing.total_s (every stage: PiLoRA's stage 1, training, "
        "final evaluation); Stage 1: the part spent in stage 1 ('reused': jobs that loaded another job's "
        "stage 1 through method.importance_from and did not pay for it).",
        "GPU-h: Σ total_s × GPUs / 3600 over GPU jobs; jobs on the CPU are shown as CPU-h (wall-clock hours, "
        "not core-hours); GPUs per job: the record's n_gpus, else its world_size. Peak memory: largest "
        "peak_memory_mb of the row's jobs (GPU: allocated by torch, one process; CPU: the process's peak "
        "resident memory).",
    ]
    assumed = sum(c.gpus_assumed for c in rows)
    if assumed:
        lines.append(
            f"{assumed} GPU job(s) do not record their GPU count (n_gpus or world_size): counted as 1 GPU each."
        )
    untimed = sum(c.untimed for c in rows)
    if untimed:
        lines.append(f"{untimed} job(s) have no timing.total_s: left out of the hours.")
    unknown = sum(c.unknown_device for c in rows)
    if unknown:
        lines.append(f"{unknown} job(s) name no device: in the wall time, in neither GPU-h nor CPU-h.")
    return lines


def cost_markdown(tables: list[Table]) -> str:
    rows = [c for t in tables for c in build_cost(t)]
    lines = ["### Cost of the runs behind the tables", ""]
    if not rows:
        return "\n".join(lines + ["No records: no cost to show.", ""])
    lines += ["| " + " | ".join(COST_HEADER) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * 4) + "|"]
    lines += ["| " + " | ".join(cost_texts(c)) + " |" for c in rows]
    lines.append("")
    lines += [f"{n}  " for n in cost_notes(rows)]
    return "\n".join(lines) + "\n"


def cost_latex(tables: list[Table]) -> str:
    rows = [c for t in tables for c in build_cost(t)]
    if not rows:
        return "% Cost: no records.\n"
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\scriptsize",
        r"\caption{Cost of the runs behind the tables}",
        r"\begin{tabular}{lllll" + "r" * 4 + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in COST_HEADER) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(t) for t in cost_texts(c)) + r" \\" for c in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += ["% " + n for n in cost_notes(rows)]
    return "\n".join(lines) + "\n"


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
    """The tables (Markdown or LaTeX), followed by the cost table unless ``cost=False``."""
    paper = paper or load_paper()
    fn = to_latex if latex else to_markdown
    built = [build_table(df, t, which, paper, params_basis) for t in tables]
    parts = [fn(t, verbose) for t in built]
    if cost:
        parts.append((cost_latex if latex else cost_markdown)(built))
    return "\n".join(parts)


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
    p.add_argument("--params-basis", choices=["adapter_share", "adapter_share_of_backbone"], default="adapter_share")
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
