"""LoRA-Dash (Si et al., ICLR 2025) as a method: plain LoRA for ``method.prelaunch_steps``, then
``method.directions`` singular directions of each frozen W, chosen by how strongly the LoRA update
moves them, get one learned coefficient each. The layers, the launch and the export are in
:mod:`pilora.methods._lora_dash`; every name there is importable from here (loaded on first use, so
that the registry loads without torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .base import Method, Plan, register_init, register_method

DASH_KEY = "lora_dash"  # PEFT saves every state key containing "lora_"
DIRECTIONS_FILE = "dash_directions.pt"  # the launch's selection, per module (an artifact, like importance.pt)
DASH_ADAPTER_DIR = "adapter_lora_dash"  # the native form (load_lora_dash); adapter/ holds its stock export


@register_init("lora_dash")
def lora_dash_init(layer, adapter, cfg=None):
    """PEFT's LoRA init plus ``cfg.directions`` zero coefficients; the directions are chosen at the
    launch, so the output equals the base model's."""
    from ._lora_dash import attach_dash
    from .config import MethodConfig

    cfg = cfg if cfg is not None else MethodConfig(name="lora_dash")
    # layer_calls: each layer counts its own forward calls and launches itself (the authors' FLAG)
    calls = int(cfg.prelaunch_steps) if cfg.prelaunch_counts == "layer_calls" else None
    attach_dash(layer, int(cfg.directions), adapter, prelaunch_calls=calls)


@dataclass(frozen=True)
class LoraDash(Method):
    def callbacks(self, model, plan: Plan, job) -> list:
        from ._lora_dash import DashLaunchCallback

        launch = DashLaunchCallback(model, plan.config.prelaunch_steps, os.path.join(job.out, DIRECTIONS_FILE))
        plan.callbacks.append(launch)
        return [launch]

    def check_training(self, args, model) -> None:
        """The launch takes the SVD of every full W0: refused under FSDP before the Trainer is built."""
        from ..distributed import fsdp_requested
        from ._lora_dash import refuse_sharded_launch

        if fsdp_requested(args):
            refuse_sharded_launch(args)

    def save(self, trainer, model, out: str, *, main: bool, sharded: bool) -> None:
        """``adapter/`` as every method's (here the rank r + s stock LoRA with the same update,
        :func:`pilora.export.save_peft_adapter`), and ``adapter_lora_dash/``: the native form, with
        coefficients and directions (:func:`load_lora_dash`)."""
        super().save(trainer, model, out, main=main, sharded=sharded)
        if main:
            from ..io import follow_umask

            native = os.path.join(out, DASH_ADAPTER_DIR)
            model.save_pretrained(native)
            follow_umask(native)

    def record(self, plan: Plan) -> dict:
        summary = next((c.summary() for c in plan.callbacks if hasattr(c, "summary")), None)
        return {**super().record(plan), self.record_key: summary}


register_method(
    "lora_dash",
    LoraDash(
        init="lora_dash",
        own_forward="LoRA-Dash",  # fused_forward=true raises
        adapter_keys=("lora_A", "lora_B", DASH_KEY),
        rows=(("lora_dash", "LoRA-Dash"),),
        record_key="lora_dash",
    ),
)


def __getattr__(name: str):
    """The implementation's names (``DashLaunchCallback``, ``load_lora_dash``, ...), on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    from . import _lora_dash

    try:
        value = getattr(_lora_dash, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
