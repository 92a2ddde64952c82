"""Full fine-tuning (``method=full``): every weight trains, through the same runner as the adapters.

The model is not wrapped by PEFT (:func:`full_finetune`); :meth:`FullFineTuning.save` saves it with
``Trainer.save_model`` (which gathers FSDP shards) into ``<output_dir>/model``. FSDP is where full
fine-tuning of a 7B model fits, so its settings are checked before the run: transformers ignores
``fsdp_config`` keys it does not know, which would silently train unsharded or wrapped differently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..hints import did_you_mean
from .base import Method, register_method

if TYPE_CHECKING:
    from torch import nn

# The fsdp_config keys transformers.TrainingArguments reads (transformers 5.x, after it strips the
# "fsdp_" prefix); any other key is ignored by it without a word.
FSDP_CONFIG_KEYS = frozenset(
    {
        "version",
        "min_num_params",
        "transformer_layer_cls_to_wrap",
        "auto_wrap_policy",
        "cpu_offload",
        "cpu_ram_efficient_loading",
        "state_dict_type",
        "activation_checkpointing",
        "reshard_after_forward",
        "forward_prefetch",
        "backward_prefetch",
        "use_orig_params",
        "sync_module_states",
        "limit_all_gathers",
        "xla",
        "xla_fsdp_v2",
        "xla_fsdp_grad_ckpt",
        "xla_fsdp_settings",
    }
)


def check_full_finetune_fsdp(args, model: nn.Module) -> None:
    """Raise a ValueError for FSDP settings a job cannot use: an ``fsdp_config`` key that
    transformers would ignore, a ``transformer_layer_cls_to_wrap`` class the model does not have
    (FSDP would then wrap the whole model as one unit, i.e. no sharding benefit), or
    ``cpu_ram_efficient_loading`` for a model whose state dict is not its parameters."""
    if not getattr(args, "fsdp", None):
        return
    config = dict(getattr(args, "fsdp_config", None) or {})
    unknown = sorted(set(config) - FSDP_CONFIG_KEYS)
    if unknown:
        hints = [k + did_you_mean(k, FSDP_CONFIG_KEYS, n=2) for k in unknown]
        raise ValueError(
            f"FSDP: trainer.fsdp_config has key(s) {', '.join(hints)} that "
            "transformers ignores; remove or rename them. Known keys: "
            f"{', '.join(sorted(FSDP_CONFIG_KEYS))}"
        )
    wrap = config.get("transformer_layer_cls_to_wrap") or []
    classes = {type(m).__name__ for m in model.modules()}
    missing = [c for c in ([wrap] if isinstance(wrap, str) else wrap) if c not in classes]
    if missing:
        blocks = sorted(c for c in classes if c.endswith(("Layer", "Block")))
        raise ValueError(
            f"FSDP: trainer.fsdp_config.transformer_layer_cls_to_wrap names "
            f"{missing}, which {type(model).__name__} does not contain; its layer classes are "
            f"{blocks or sorted(classes)}"
        )
    if str(config.get("cpu_ram_efficient_loading", "")).lower() in ("true", "1"):
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}  # tied weights too
        other = sorted(k for k in model.state_dict() if k not in params)
        if other:
            # accelerate's FSDP2 loader broadcasts every state-dict entry as a sharded parameter
            # (AttributeError: 'Tensor' object has no attribute 'device_mesh' at the first other one)
            raise ValueError(
                "FSDP: trainer.fsdp_config.cpu_ram_efficient_loading=true loads a state dict of parameters "
                f"only, and this model's holds {len(other)} other entries (e.g. {other[0]}; PiLoRA saves its "
                "B blocks compactly and its partition masks as buffers). Set "
                "trainer.fsdp_config.cpu_ram_efficient_loading=false"
            )


def full_finetune(model: nn.Module, cfg=None) -> nn.Module:
    """Full fine-tuning: every weight of the model trains (backbone and task head alike)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@dataclass(frozen=True)
class FullFineTuning(Method):
    """No adapter: r, α, dropout and targets are kept in the config (shared with the adapter
    methods' sweeps) and unused."""

    def build(self, model, cfg, *, masks=None, stage=None, task_type=None):
        return full_finetune(model, cfg)

    def save(self, trainer, model, out: str, *, main: bool, sharded: bool) -> None:
        if main or sharded:  # under FSDP every rank joins Trainer's gather; rank 0 writes
            trainer.save_model(os.path.join(out, "model"))


register_method("full", FullFineTuning(adapter=False, adapter_keys=(), rows=(("full", "Full FT"),)))
