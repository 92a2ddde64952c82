"""Tables 1-4 of the paper from run records, ours beside the published numbers.

    python -m analysis.tables                        # outputs/ + multirun/, all four tables, Markdown
    python -m analysis.tables --root multirun/table2_glue --table 2 --which final
    python -m analysis.tables --latex --table 1 3
    python -m analysis.tables --wandb-project pilora # records from W&B (cached locally)

Every cell reads ``ours / paper``. *Ours* is the mean over seeds of one configuration, with the
sample standard deviation and the number of seeds when there are several (``81.20 ± 0.31
(n=3)``), a single value for one seed, and ``—`` when no run exists. *Paper* is the number printed
in the paper (``analysis/paper_numbers.json``, the only place these numbers live) or ``—``. No
number is ever made up: an average is only shown when every column has a value.

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

from .records import load_records, load_wandb, partition_label, say

PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_numbers.json")
TABLE_IDS = ("1", "2", "3", "4")
METHOD_NAMES = {"lora": "LoRA", "lora_matched": "LoRA (PiLoRA's budget)", "rslora": "rsLoRA", "dora": "DoRA",
                "pissa": "PiSSA", "milora": "MiLoRA", "pilora": "PiLoRA"}
METHOD_ORDER = ["lora", "lora_matched", "rslora", "dora", "pissa", "milora", "pilora"]
MODEL_NAMES = {"llama2-7b": "LLaMA2-7B", "llama3-8b": "LLaMA3-8B", "roberta-large": "RoBERTa-large",
               "clip-vit-b32": "CLIP ViT-B/32"}
KEY_NAMES = {"method.r": "r", "method.supplementary_r": "r'", "method.alpha": "α",
             "method.supplementary_alpha": "α'", "method.partition.name": "partition",
             "method.stage1_r": "stage-1 r", "method.importance_interval": "K",
             "method.stage1.max_steps": "stage-1 steps", "method.stage1.epochs": "stage-1 epochs",
             "trainer.learning_rate": "lr", "trainer.num_train_epochs": "epochs",
             "trainer.max_steps": "max_steps", "trainer.per_device_train_batch_size": "batch"}
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

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def fmt(self, d: int) -> str:
        if self.n > 1:
            return f"{self.mean:.{d}f} ± {self.std:.{d}f} (n={self.n})"
        return f"{self.mean:.{d}f}"


@dataclass
class Row:
    model: str                      # display name
    method: str                     # display label
    paper: dict | None = None       # the paper's row, if this row is one
    model_config: str | None = None
    row_id: str | None = None
    label: str = ""                 # what distinguishes this configuration (extra rows)
    cells: dict = field(default_factory=dict)      # column key -> Stat | None
    avg: Stat | None = None
    params: list = field(default_factory=list)    # ours, percent, one per record
    groups: list = field(default_factory=list)    # (task, config_key, seeds, paths)

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
    return "partition:" + json.dumps([name, {k: float(v) if isinstance(v, (int, float)) else v
                                               for k, v in sorted(args.items())}])


def _row_id(rec: pd.Series, row_key: str) -> str:
    if row_key == "partition":
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
        ratios = {round(c["method.alpha"] / c["method.r"], 9) for c in configs.values()
                  if isinstance(c.get("method.alpha"), (int, float)) and c.get("method.r")}
        if len(ratios) == 1:
            varying.discard("method.alpha")
    return sorted(varying)


_LABEL_ORDER = ["method.r", "method.alpha", "method.supplementary_r", "method.supplementary_alpha",
                "method.partition.name"]


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
    return Stat([statistics.fmean(s.mean for s in stats)], [])


def build_table(df: pd.DataFrame, table_id: str, which: str = "best", paper: dict | None = None,
                params_basis: str = "adapter_share") -> Table:
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
    if row_key == "partition" and not sub.empty:
        sub = sub[sub["method"] == "pilora"]
    sub = sub.copy()
    if not sub.empty:
        sub["_row_id"] = [_row_id(r, row_key) for _, r in sub.iterrows()]

    paper_rows = [Row(model=p["model"] + (" †" if p.get("dagger") and p["method"] == DASH else ""),
                      method=p["method"] + (" †" if p.get("dagger") and p["method"] != DASH else ""), paper=p,
                      model_config=p.get("model_config"), row_id=_paper_row_id(p, row_key))
                  for p in spec["rows"]]
    extra: dict[str, list[Row]] = {}
    for (model, rid), grp in (sub.groupby(["model", "_row_id"], sort=False) if not sub.empty else []):
        configs = {ck: g.iloc[0]["config"] for ck, g in grp.groupby("config_key")}
        cells = {t: set(g["config_key"]) for t, g in grp.groupby("task")}
        varying = _varying_keys(configs, cells)
        ref = (spec.get("reference") or {}).get(model) or {}
        target = next((r for r in paper_rows if r.model_config == model and r.row_id == rid), None)
        labels, on_paper = {}, set()
        for ck, conf in configs.items():
            mismatch = [k for k in ref if k in conf and not _eq(conf[k], ref[k])]
            labels[ck] = _label(conf, set(varying) | set(mismatch))
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
                if row_key == "partition":
                    first = recs.iloc[0]
                    name = partition_label(first["partition"], first["partition_args"]) or "?"
                else:
                    name = METHOD_NAMES.get(rid, rid)
                row = Row(model=MODEL_NAMES.get(model, model), method=name + (f" ({lab})" if lab else ""),
                          model_config=model, row_id=rid, label=lab)
                extra.setdefault(model, []).append(row)
            row.cells = {c["key"]: _cell_stat(recs[recs["task"] == c["task"]], fields[c["key"]]) for c in cols}
            row.avg = _avg_stat(row.cells)
            row.params = [100.0 * float(v) for v in recs[params_basis].dropna()]
            row.groups = [(t, ck, sorted(g["seed"]), list(g["path"]))
                          for (t, ck), g in recs.groupby(["task", "config_key"])]
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
    return Table(str(table_id), spec, rows, which, params_basis, len(sub))


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


def cell_texts(table: Table, row: Row) -> list[str]:
    """The texts of one row: model, method, # params, one per column, average."""
    d = table.decimals
    p = row.paper or {}
    pp = p.get("params_pct")
    paper_params = DASH if pp is None else f"{pp:g}" if pp == 100 else f"{pp:.2f}"
    out = [row.model, row.method, f"{_params_text(row)} / {paper_params}"]
    for c in table.columns:
        s = row.cells.get(c["key"])
        out.append(f"{s.fmt(d) if s else DASH} / {_paper_text((p.get('values') or {}).get(c['key']), d)}")
    out.append(f"{row.avg.fmt(d) if row.avg else DASH} / {_paper_text(p.get('avg'), d)}")
    return out


def header(table: Table) -> list[str]:
    avg = table.spec.get("avg_label", "Avg.")
    return ["Model", "Method", "# Params (%)"] + [c["label"] for c in table.columns] + [avg]


def notes(table: Table, verbose: bool = False) -> list[str]:
    spec = table.spec
    lines = [f"Each cell: ours / paper. Ours: mean ± sample std over seeds (n seeds) when there are "
             f"several, {DASH} = no run. Score: {spec.get('metric', 'accuracy (%)')}"
             + (f"; GLUE columns at the {table.which} epoch" if "{which}" in json.dumps(spec["columns"]) else "") + "."]
    basis = {"adapter_share": "100 × adapter / all parameters",
             "adapter_share_of_backbone": "100 × adapter / backbone parameters"}.get(table.params_basis,
                                                                                      table.params_basis)
    lines.append(f"# Params (%): ours = {basis} from the records; paper as printed.")
    if spec.get("dagger_sources"):
        lines.append("† reported in " + "; ".join(spec["dagger_sources"]) + ", copied by the paper"
                     + (" (per-row source: analysis/paper_numbers.json)." if len(spec["dagger_sources"]) > 1 else "."))
    if any(r.paper is None for r in table.rows):
        lines.append("Rows without a paper number are configurations the paper does not report "
                     "(other model, method or setting; the label says what differs).")
    if table.n_records == 0:
        lines.append("No records for this table: only the paper's numbers are shown.")
    if verbose:
        for r in table.rows:
            for t, ck, seeds, paths in r.groups:
                lines.append(f"  {r.model} / {r.method}: {t} config {ck} seeds {seeds}: "
                             + ", ".join(os.path.dirname(p) for p in paths))
    return lines


def to_markdown(table: Table, verbose: bool = False) -> str:
    head = header(table)
    lines = [f"### {table.spec['title']}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in table.rows:
        lines.append("| " + " | ".join(cell_texts(table, r)) + " |")
    lines.append("")
    lines += [f"{n}  " if not n.startswith("  ") else n for n in notes(table, verbose)]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    s = (s.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
         .replace("#", r"\#"))
    return (s.replace(" ± ", r"$\pm$").replace("±", r"$\pm$").replace(DASH, "---").replace(" †", r"$^\dagger$")
            .replace("–", "--").replace("α", r"$\alpha$").replace("τ", r"$\tau$"))


def to_latex(table: Table, verbose: bool = False) -> str:
    head = header(table)
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\caption{" + _tex(table.spec["title"]) + r" (ours / paper)}",
             r"\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", r"\toprule",
             " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
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
            out.append({"model": r.model, "method": r.method, "column": c["label"],
                        "ours_mean": s.mean if s else None, "ours_std": s.std if s else None,
                        "n": s.n if s else 0, "paper": paper_v})
    return pd.DataFrame(out)


def render(df: pd.DataFrame, tables=TABLE_IDS, which: str = "best", latex: bool = False,
           params_basis: str = "adapter_share", verbose: bool = False, paper: dict | None = None) -> str:
    paper = paper or load_paper()
    fn = to_latex if latex else to_markdown
    return "\n".join(fn(build_table(df, t, which, paper, params_basis), verbose) for t in tables)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tables 1-4: our records beside the paper's numbers.")
    p.add_argument("--root", action="append", help="results tree (repeatable; default outputs/ and multirun/)")
    p.add_argument("--table", nargs="+", choices=TABLE_IDS, default=list(TABLE_IDS))
    p.add_argument("--which", choices=["best", "final"], default="best",
                   help="GLUE: validation accuracy of the best or the last epoch (default best)")
    p.add_argument("--latex", action="store_true", help="LaTeX instead of Markdown")
    p.add_argument("--params-basis", choices=["adapter_share", "adapter_share_of_backbone"],
                   default="adapter_share")
    p.add_argument("--verbose", action="store_true", help="list the configurations and folders behind each row")
    p.add_argument("--wandb-project", help="read records from this W&B project instead of --root")
    p.add_argument("--wandb-entity")
    p.add_argument("--wandb-cache", help="cache folder (default $PILORA_WANDB_CACHE or .wandb_cache)")
    p.add_argument("--refresh", action="store_true", help="pull the W&B project again")
    p.add_argument("--out", help="also write the output to this file")
    args = p.parse_args(argv)
    if args.wandb_project:
        df = load_wandb(args.wandb_project, args.wandb_entity, args.wandb_cache, refresh=args.refresh)
    else:
        df = load_records(args.root)
    if df.empty:
        say("showing the paper's numbers only (ours: —)")
    text = render(df, args.table, args.which, args.latex, args.params_basis, args.verbose)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
