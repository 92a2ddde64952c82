"""The headline number of each record, and the words that say what it is."""

from __future__ import annotations

from typing import Iterable

import pandas as pd


def score(df: pd.DataFrame, which: str = "best") -> pd.Series:
    """The headline number of each record (a fraction): commonsense -> ``test_avg_accuracy``,
    vision -> ``test_accuracy`` (test split), classification/GLUE -> validation
    ``<which>_eval_<metric>`` (``which`` = best | final epoch)."""
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', not {which!r}")
    out = pd.Series(float("nan"), index=df.index, dtype=float)
    for idx, row in df.iterrows():
        fam = row.get("family")
        if fam == "generation":
            col = "test_avg_accuracy"
        elif fam == "vision":
            col = "test_accuracy"
        else:
            col = f"{which}_eval_{row.get('metric') or 'accuracy'}"
        v = row.get(col)
        out[idx] = float(v) if v is not None and not pd.isna(v) else float("nan")
    return out


def score_label(families: Iterable[str], which: str = "best") -> str:
    fams = set(families)
    parts = []
    if "generation" in fams:
        parts.append("commonsense: mean test accuracy over the test sets")
    if "vision" in fams:
        parts.append("vision: test accuracy")
    if fams - {"generation", "vision"}:
        parts.append(f"classification: validation accuracy at the {which} epoch")
    return "; ".join(parts) or "accuracy"
