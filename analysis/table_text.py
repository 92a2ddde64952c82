"""A table as text: cell strings, notes, Markdown and LaTeX."""

from __future__ import annotations

import json
import os
import statistics

from .table_model import DASH, OTHER_BASIS, PARAMS_BASES, Row, Table


def _pcts_text(values: list) -> str:
    lo, hi = min(values), max(values)
    if round(lo, 2) == round(hi, 2):
        return f"{statistics.fmean(values):.2f}"
    return f"{lo:.2f}–{hi:.2f}"


def _params_text(row: Row) -> str:
    """Ours on the table's basis, and in parentheses on the other one where it reads differently."""
    if not row.params:
        return DASH
    text = _pcts_text(row.params)
    if row.params_other and _pcts_text(row.params_other) != text:
        text += f" ({_pcts_text(row.params_other)})"
    return text


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
    basis = PARAMS_BASES.get(table.params_basis, table.params_basis)
    other = PARAMS_BASES.get(OTHER_BASIS.get(table.params_basis), "the other basis")
    lines.append(f"# Params (%): ours = {basis} from the records (in parentheses: {other}); paper as printed.")
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


def source_text(notes: list[str], latex: bool = False) -> str:
    """The notes on the records (:func:`analysis.records.source_notes`) as a "Notes on the records:"
    list (LaTeX: comment lines); '' when there are none."""
    if not notes:
        return ""
    if latex:
        return "\n".join(["% Notes on the records:"] + [f"% - {n}" for n in notes]) + "\n"
    return "\n".join(["Notes on the records:", ""] + [f"- {n}" for n in notes]) + "\n"


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
