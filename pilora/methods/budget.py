"""Budget-matched LoRA: per-module ranks whose parameter count is nearest a PiLoRA run's.

PiLoRA's claim is accuracy per trainable parameter, so the fair baseline is a LoRA with the
same budget, not only LoRA at the full rank. For each module with dominant mask ``M``:

    PiLoRA count  = (r + r')·n + |M|·r + (m − |M|)·r'
    LoRA rank k   = round(PiLoRA count / (m + n)), at least 1

passed to PEFT as ``rank_pattern``; the residual difference is reported, never hidden. A
matchable method (``Method.matchable``, LoRA) with ``match_budget=true`` runs PiLoRA's stage 1 (or
reuses its statistics, ``importance_from``) and trains with these ranks (:func:`match`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .base import JobContext, Plan

log = logging.getLogger("pilora")


def pilora_module_count(m: int, n: int, dominant: int, r: int, r_s: int) -> int:
    return (r + r_s) * n + dominant * r + (m - dominant) * r_s


def matched_rank_pattern(
    masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], r: int, r_s: int
) -> tuple[dict[str, int], dict]:
    """``rank_pattern`` (full module names, regex-escaped for PEFT) and a budget summary."""
    pattern, target, achieved = {}, 0, 0
    for name, mask in masks.items():
        m, n = shapes[name]
        count = pilora_module_count(m, n, int(mask.sum()), r, r_s)
        k = max(1, round(count / (m + n)))
        pattern[re.escape(name)] = k  # PEFT matches (.*\.)?<key>$: a full name selects one module
        target += count
        achieved += k * (m + n)
    return pattern, {
        "pilora_adapter_params": target,
        "lora_adapter_params": achieved,
        "residual": achieved - target,
        "residual_share": (achieved - target) / max(target, 1),
    }


def match(cfg, job: JobContext) -> Plan:
    """The plan of a budget-matched job: PiLoRA's stage 1 and partition, and the ranks (in a copy
    of ``cfg``) whose count is nearest PiLoRA's; the record's ``budget_match`` section."""
    from .base import Plan
    from .pilora import stage1_partition

    stats, path, masks = stage1_partition(cfg, job)
    shapes = {k: tuple(s.shape) for k, s in stats.modules.items()}
    pattern, budget = matched_rank_pattern(masks, shapes, cfg.r, cfg.supplementary_r)
    budget.update({"importance_file": path, "ranks": pattern})
    log.info(
        "budget-matched LoRA: %d adapter parameters vs PiLoRA's %d (residual %+d)",
        budget["lora_adapter_params"],
        budget["pilora_adapter_params"],
        budget["residual"],
    )
    # each module's α follows its rank k (α·k/r), so the scale stays the job's s = α/r (α = 2r, Tab. 5-7),
    # PiLoRA's own: the budget is what differs, not the update's scale
    alphas = {name: float(cfg.alpha) * k / int(cfg.r) for name, k in pattern.items()}
    return Plan(
        replace(cfg, rank_pattern=pattern, alpha_pattern=alphas),
        None,
        stats,
        path,
        title=cfg.name,
        sections={"budget_match": budget},
    )
