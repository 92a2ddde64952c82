"""Methods and initialisations: pretrained model + method config -> the model to train.

A method is one module of this package that registers a :class:`~pilora.methods.base.Method`
(:func:`register_method`), plus one ``conf/method/<name>.yaml`` that sets what differs from the
defaults. Every module here whose name does not start with ``_`` is imported below, so a new
module registers itself; each config key is declared once, on :class:`MethodConfig`
(:mod:`pilora.methods.config`). ``python -m pilora.methods`` prints the keys.

Modules: :mod:`.base` (the :class:`Method` hooks the runner calls, the registries),
:mod:`.config` (the keys), :mod:`.lora` (LoRA, rsLoRA, DoRA), :mod:`.svd` (PiSSA, MiLoRA),
:mod:`.pilora` (PiLoRA's two stages), :mod:`.budget` (the budget-matched LoRA),
:mod:`.lora_dash` (LoRA-Dash), :mod:`.full` (full fine-tuning).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from .base import (  # noqa: F401
    INITS,
    METHODS,
    JobContext,
    Method,
    Plan,
    adapter_keys,
    check_target_modules,
    linear_module_names,
    record_sections,
    register_init,
    register_method,
    table_rows,
)
from .config import (  # noqa: F401
    ADAPTER,
    ALL,
    DEFAULT_PARTITION,
    MATCHED,
    PRELAUNCH_COUNTS,
    STAGE1,
    STAGE1_KEYS,
    Key,
    MethodConfig,
    PartitionConfig,
    Stage1Config,
    always_recorded_keys,
    applicable_keys,
    describe_keys,
    integer_bounds,
    key_of,
    recorded_section,
)

if TYPE_CHECKING:
    from torch import nn


def _discover() -> None:
    """Import every public module of this package: each registers its methods."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

from .full import full_finetune  # noqa: E402,F401
from .pilora import interpretations  # noqa: E402,F401
from .svd import milora_init  # noqa: E402,F401


def lora_config(cfg: MethodConfig, task_type: str | None = None, r: int | None = None):
    """The PEFT ``LoraConfig`` for a method (for PiLoRA: its plain-LoRA stages)."""
    return METHODS[cfg.name].peft_config(cfg, task_type, r=r)


def prepare_model(
    model: nn.Module,
    cfg: MethodConfig | dict,
    *,
    masks: dict | None = None,
    stage: int | None = None,
    task_type: str | None = None,
):
    """Wrap ``model`` (pretrained, frozen) with the adapters of ``cfg``.

    For PiLoRA, ``stage=1`` (or ``masks=None``) gives the plain rank-r LoRA of stage 1, and
    ``masks`` (dominant rows per module) gives the stage-2 model of Eq. 10.
    """
    if isinstance(cfg, dict):
        cfg = MethodConfig.from_dict(cfg)
    return METHODS[cfg.name].build(model, cfg, masks=masks, stage=stage, task_type=task_type)
