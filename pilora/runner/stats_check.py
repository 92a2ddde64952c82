"""Checks that importance statistics (``importance.pt``, possibly another job's through
``method.importance_from``) were made for the model and target modules of this run, before their
partition is used: otherwise extra modules count into the recorded dominant fraction, and missing
or resized modules fail deep inside the layer conversion without naming the file."""

from __future__ import annotations

from torch import nn

from ..importance import ImportanceStats
from ..methods import MethodConfig, lora_config


def target_shapes(model: nn.Module, method: MethodConfig) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every linear layer of the (un-wrapped) ``model`` that the
    method's LoRA adapts, keyed by module name as in the statistics."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = lora_config(method)
    return {
        name: (mod.out_features, mod.in_features)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name and check_target_module_exists(config, name)
    }


def check_statistics(
    stats: ImportanceStats, path: str, model: nn.Module, method: MethodConfig, model_name: str
) -> None:
    """Raise a ValueError naming ``path`` (and the modules) when ``stats`` do not fit this run."""
    fix = (
        "Use the importance.pt of a stage-1 run with the same model and target_modules, or drop "
        "method.importance_from to run stage 1 for this job."
    )
    meta = stats.meta or {}
    if meta.get("model") not in (None, model_name):
        raise ValueError(
            f"importance statistics {path!r} were made for model {meta['model']!r}, this run uses {model_name!r}. {fix}"
        )
    targets = meta.get("target_modules")
    mine = method.target_modules if isinstance(method.target_modules, str) else sorted(method.target_modules)
    if targets is not None and (sorted(targets) if isinstance(targets, list) else targets) != mine:
        raise ValueError(
            f"importance statistics {path!r} were made for target modules {targets}, this run adapts {mine}. {fix}"
        )
    try:
        stats.check_matches(target_shapes(model, method))
    except ValueError as err:
        raise ValueError(f"importance statistics {path!r}: {err}") from None
    impossible = impossible_counts(stats)
    if impossible:
        raise ValueError(
            f"importance statistics {path!r} cannot come from stage 1: {'; '.join(impossible[:3])}"
            + (f"; ... ({len(impossible)} modules)" if len(impossible) > 3 else "")
            + f". The file is damaged or was edited{_diverged(impossible)}. {fix}"
        )


def _diverged(problems: list[str]) -> str:
    """A non-finite score sum also comes from a stage 1 whose gradients became NaN/inf in bf16/fp32
    (under an fp16 loss scaler such checks are skipped): say so, with the fix."""
    if not any("NaN/inf score sum" in p for p in problems):
        return ""
    return (
        ", or its stage 1 diverged (NaN/inf LoRA gradients: lower trainer.learning_rate, keep "
        "trainer.max_grad_norm > 0, or check model.dtype)"
    )


def impossible_counts(stats: ImportanceStats) -> list[str]:
    """Per module, what no stage 1 can produce: a hit count outside ``0..T`` (a row is dominant at
    most once per check), a negative T, or a non-finite score sum. Such statistics would still
    partition (the ranking only compares H), silently."""
    import torch

    out = []
    for name, s in sorted(stats.modules.items()):
        t = int(s.checks)
        hits = s.hits.to(torch.int64)
        if t < 0:
            out.append(f"{name}: T = {t} checks")
        elif hits.numel() and (int(hits.max()) > t or int(hits.min()) < 0):
            out.append(f"{name}: hit counts {int(hits.min())}..{int(hits.max())} outside 0..T = {t}")
        elif s.score_sum.is_floating_point() and not bool(torch.isfinite(s.score_sum).all()):
            bad = int((~torch.isfinite(s.score_sum)).sum())
            out.append(f"{name}: {bad} NaN/inf score sum(s)")
    return out
