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
