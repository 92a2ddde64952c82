"""The headline number of each record, and the words that say what it is."""

from __future__ import annotations

from typing import Iterable

import pandas as pd

# the rule records from before ``evaluation.headline`` follow (their tasks named no headline)
_FAMILY_HEADLINES = {
    "generation": ("test_avg_accuracy", "test"),
    "vision": ("test_accuracy", "test"),
    "classification": (None, "epoch"),  # eval_<metric>
}


def headline_column(row, which: str = "best") -> str:
    """The column holding a record row's headline number: the task's own choice
    (``evaluation.headline``: a ``metrics.test`` key, or an epoch metric read at the ``which`` epoch),
    else its family's rule. A row naming neither raises: a score of NaN would pass for a result."""
    metric, source = row.get("headline_metric"), row.get("headline_from")
    if not isinstance(metric, str) or pd.isna(metric):
        family = row.get("family")
        if family not in _FAMILY_HEADLINES:
            raise ValueError(
                f"record {row.get('path') or row.get('task')!r} (task family {family!r}) names no headline "
                "metric (evaluation.headline) and its family has no known rule; rerun it with a task "
                "that defines Task.headline()"
            )
        metric, source = _FAMILY_HEADLINES[family]
        metric = metric or f"eval_{row.get('metric') or 'accuracy'}"
    return metric if source == "test" else f"{which}_{metric}"


def score(df: pd.DataFrame, which: str = "best") -> pd.Series:
    """The headline number of each record (a fraction), in the column :func:`headline_column` names:
    commonsense -> ``test_avg_accuracy``, vision -> ``test_accuracy`` (test split), GLUE ->
    validation ``<which>_eval_<metric>`` (``which`` = best | final epoch), or ``test_<metric>`` when
    the dev set is scored once (``task.selection_split=train_holdout``)."""
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', not {which!r}")
    out = pd.Series(float("nan"), index=df.index, dtype=float)
    for idx, row in df.iterrows():
        v = row.get(headline_column(row, which))
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
