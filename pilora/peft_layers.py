"""Finding PEFT's LoRA layers in a model, under the base model's module names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """Strip PEFT's wrapper prefix so statistics, masks and files key on the base model's module names."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """PEFT LoRA linear layers of ``model`` that carry ``adapter_name``, keyed by base-model name."""
    from peft.tuners.lora import Linear as LoraLinear

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            found[canonical_name(name)] = module
    return found
