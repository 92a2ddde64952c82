"""Partition strategies: stage-1 statistics of one layer -> dominant-row mask ``M ∈ {0,1}^m``.

Each strategy is a function ``f(stats: ModuleStats, *, name: str, **params) -> BoolTensor``
registered under a name. Its arguments are the keyword parameters its signature names (``name``,
the module's name, is passed by :func:`partition` itself; ``**_`` only takes that): any other
argument is refused, so that a misspelled ``tua=0.5`` cannot split with the default τ.

=================  ===========================================================  ==================
``hit_frequency``  ``M_i = 1`` where ``H_i ≥ τ·T`` (τ = 0.5 by default)          "Ours", Tab. 1-4
``cumulative``     shortest prefix of rows sorted by ``H`` (ties by ``ΣS``)       Fig. 6
                   whose share of ``ΣH`` reaches ``threshold``
``top_fraction``   top ``fraction`` of rows by ``ΣS`` (0.5 is "Top-half")         Tab. 4
``random``         a seeded uniformly random ``fraction`` of rows                 Tab. 4
=================  ===========================================================  ==================
"""

from __future__ import annotations

import inspect
import math
import zlib
from typing import TYPE_CHECKING, Callable

from .hints import did_you_mean

# torch is imported where it is used: ``pilora`` imports this module eagerly (its ``partition``
# function shares the module's name), and ``pilora`` must load without torch (see __init__.py)
if TYPE_CHECKING:
    import torch

    from .importance import ImportanceStats, ModuleStats

PARTITIONS: dict[str, Callable[..., torch.Tensor]] = {}


def register_partition(name: str):
    def deco(fn):
        PARTITIONS[name] = fn
        return fn

    return deco


def _strategy(strategy: str) -> Callable[..., torch.Tensor]:
    if strategy not in PARTITIONS:
        raise ValueError(f"unknown partition strategy {strategy!r}; choose one of {sorted(PARTITIONS)}")
    return PARTITIONS[strategy]


def strategy_args(strategy: str) -> list[str]:
    """The arguments ``strategy`` takes: the keyword parameters of its function after ``stats``,
    but ``name`` (which :func:`partition` sets per module)."""
    params = list(inspect.signature(_strategy(strategy)).parameters.values())[1:]
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword and p.name != "name"]


def check_args(strategy: str, params, prefix: str = "") -> None:
    """Raise a ValueError naming each key of ``params`` that ``strategy`` does not take (with the
    closest argument it does take), and the ones it takes; ``prefix`` is how the caller's config
    spells the keys (``"method.partition.args."``)."""
    accepted = strategy_args(strategy)
    unknown = [k for k in params if k not in accepted]
    if not unknown:
        return
    named = []
    for k in unknown:
        named.append(f"{prefix + str(k)!r}" + did_you_mean(k, accepted, prefix=prefix, quote=True))
    raise ValueError(
        f"partition strategy {strategy!r} takes no argument{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
        + (f"its arguments are {accepted}" if accepted else "it takes no arguments")
    )


def _unit_interval(label: str, value: float) -> float:
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"partition {label} must lie in (0, 1], got {value}")
    return float(value)


def _top_k(order_keys: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    mask = torch.zeros(order_keys.numel(), dtype=torch.bool)
    mask[torch.argsort(order_keys, descending=True, stable=True)[:k]] = True
    return mask


@register_partition("hit_frequency")
def hit_frequency(stats: ModuleStats, *, tau: float = 0.5, **_) -> torch.Tensor:
    """Rows important in at least a fraction ``τ`` of the ``T`` checks."""
    tau = _unit_interval("tau", tau)
    if stats.checks == 0:
        raise ValueError(
            "no importance checks were recorded (T = 0): run stage 1 for at least one "
            "optimizer step, or lower method.importance_interval"
        )
    return stats.hits >= tau * stats.checks - 1e-9


@register_partition("cumulative")
def cumulative(stats: ModuleStats, *, threshold: float = 0.7, **_) -> torch.Tensor:
    """Smallest group of rows (by ``H``, ties by ``ΣS``) holding ``threshold`` of ``ΣH``."""
    import torch

    threshold = _unit_interval("threshold", threshold)
    hits = stats.hits.double()
    mass = hits if hits.sum() > 0 else stats.score_sum.double()  # no hits at all: fall back to ΣS
    if mass.sum() <= 0:
        raise ValueError("cumulative partition needs non-zero importance: all hits and scores are 0")
    # rank by H, ties by ΣS (then by row): two stable sorts, the minor key first, so ΣS of any
    # size never outranks a hit nor vanishes next to one
    by_score = torch.argsort(stats.score_sum.double(), descending=True, stable=True)
    order = by_score[torch.argsort(hits[by_score], descending=True, stable=True)]
    share = torch.cumsum(mass[order], 0) / mass.sum()
    k = int(torch.searchsorted(share, torch.tensor(threshold - 1e-12, dtype=share.dtype))) + 1
    mask = torch.zeros_like(stats.hits, dtype=torch.bool)
    mask[order[: min(k, mask.numel())]] = True
    return mask


def rows_of(fraction: float, m: int) -> int:
    """``fraction·m`` rounded half up (at least 1): 0.5 of 5 rows is 3, of 3 rows 2 (Python's
    ``round`` goes to the even neighbour, so half of 5 rows would be 2 and half of 3 rows 2)."""
    return max(1, math.floor(fraction * m + 0.5))


@register_partition("top_fraction")
def top_fraction(stats: ModuleStats, *, fraction: float = 0.5, **_) -> torch.Tensor:
    """The ``fraction·m`` rows (:func:`rows_of`) with the largest accumulated score ``ΣS``."""
    fraction = _unit_interval("fraction", fraction)
    return _top_k(stats.score_sum, rows_of(fraction, stats.hits.numel()))


@register_partition("random")
def random(stats: ModuleStats, *, fraction: float = 0.5, seed: int = 0, name: str = "", **_) -> torch.Tensor:
    """A uniformly random ``fraction·m`` rows (:func:`rows_of`); the seed is mixed with the module name so
    layers of the same shape get different (but reproducible) rows."""
    import torch

    fraction = _unit_interval("fraction", fraction)
    m = stats.hits.numel()
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m, generator=gen)[: rows_of(fraction, m)]] = True
    return mask


def partition(stats: ImportanceStats, strategy: str = "hit_frequency", **params) -> dict[str, torch.Tensor]:
    """Dominant-row masks for every layer in ``stats`` under the named strategy."""
    fn = _strategy(strategy)
    check_args(strategy, params)
    return {name: fn(s, name=name, **params).bool() for name, s in stats.modules.items()}


def dominant_fractions(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """``|M|/m`` per module and ``"overall"`` (rows pooled over modules)."""
    out = {name: float(m.float().mean()) for name, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    out["overall"] = sum(int(m.sum()) for m in masks.values()) / total if total else math.nan
    return out
