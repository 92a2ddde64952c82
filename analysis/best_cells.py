"""Which cell is marked best: the no-win-within-spread rule (``docs/tables.md``)."""

from __future__ import annotations

from .table_model import Row


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
