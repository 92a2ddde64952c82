"""Parameter accounting, in one place.

``count_parameters`` counts what PEFT's ``print_trainable_parameters`` prints (trainable, all
parameters including adapters, and their ratio), plus the adapter-only count the paper's
"# Params" column uses. It only reads ``numel``, so it works on models built on the meta device.
One difference: a head trained in full (``modules_to_save``) counts once. PEFT keeps a frozen
copy of it (``original_module``, to disable the adapter) and counts both, which puts RoBERTa-large's
share at 3.82 % instead of the 3.83 % of the model that runs (one head, the trained one).

The paper's settings counted from configs alone are in :mod:`pilora.paper_params`
(``python -m pilora.paper_params``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

# parameter-name parts of adapter tensors: plain LoRA's, and each registered method's own
# (``Method.adapter_keys``: DoRA's magnitude vector, LoRA-Dash's coefficients, ...)
ADAPTER_KEYS = ("lora_A", "lora_B")


@dataclass
class ParamCount:
    trainable: int  # everything with requires_grad (adapters + heads trained in full)
    total: int  # all parameters, adapters included (PEFT's "all params")
    adapter: int  # LoRA / PiLoRA / DoRA / LoRA-Dash adapter parameters only (the paper's # Params);
    # full fine-tuning: every trained parameter
    backbone: int  # the pretrained encoder/decoder without task head and adapters
    full_finetune: bool = False  # no adapter: every weight trains (the paper's "100 %")
    # numbers the optimizer holds for the trainable parameters: equals ``trainable`` except for
    # PiLoRA's stage-2 ``B``, stored as one m × (r + r') tensor whose structural zeros (kept at
    # exactly zero) are not parameters of Eq. 10 and so are not in ``trainable`` / ``adapter``
    stored_trainable: int | None = None

    def __post_init__(self):
        if self.stored_trainable is None:
            self.stored_trainable = self.trainable

    @property
    def share(self) -> float:
        """PEFT-style share: trainable / all params (adapters included)."""
        return self.trainable / self.total if self.total else 0.0

    @property
    def adapter_share(self) -> float:
        """Adapter parameters / all params (PEFT-style, head excluded from the numerator)."""
        return self.adapter / self.total if self.total else 0.0

    @property
    def adapter_share_of_backbone(self) -> float:
        """Adapter parameters / backbone without adapters (GOAT's "4.00 %" convention)."""
        if self.full_finetune:  # the whole backbone trains (the head, outside the backbone, too)
            return 1.0
        return self.adapter / self.backbone if self.backbone else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "share": self.share,
            "adapter_share": self.adapter_share,
            "adapter_share_of_backbone": self.adapter_share_of_backbone,
        }


def count_parameters(model: nn.Module) -> ParamCount:
    """Count parameters of a (PEFT) model; shared tensors are counted once.

    A parameter whose module says it stores structural zeros (``effective_numel()``, PiLoRA's
    stage-2 ``B``) counts with its effective size (the paper's count); ``stored_trainable`` adds
    the structural zeros the optimizer holds."""
    effective = {
        id(getattr(m, "blocks")): m.effective_numel()
        for m in model.modules()
        if callable(getattr(m, "effective_numel", None)) and isinstance(getattr(m, "blocks", None), nn.Parameter)
    }
    trainable = total = adapter = stored = 0
    keys = adapter_keys()
    for name, p in _unique_parameters(model):
        if ".original_module." in f".{name}.":  # PEFT's frozen copy of a modules_to_save head
            continue
        n = effective.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
        stored += p.numel() if p.requires_grad else 0
        adapter += n if _is_adapter(name, keys) else 0
    # The backbone is the HF "base model" (e.g. RobertaModel inside ...ForSequenceClassification):
    # no task head, no adapters. GOAT's "4.00 %" divides by this.
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = sum(
        p.numel()
        for name, p in _unique_parameters(getattr(hf, "base_model", hf))
        if not _is_adapter(name, keys) and ".modules_to_save." not in f".{name}"
    )
    full = not hasattr(model, "peft_config")
    if full:  # full fine-tuning (no adapter): the method's own trained weights are all of them (100 %)
        adapter = trainable
    return ParamCount(trainable, total, adapter, backbone, full, stored)


def adapter_keys() -> tuple[str, ...]:
    """:data:`ADAPTER_KEYS` and every registered method's :attr:`~pilora.methods.Method.adapter_keys`."""
    from .methods import adapter_keys as registered

    return tuple(dict.fromkeys(ADAPTER_KEYS + registered()))


def _is_adapter(name: str, keys: tuple[str, ...] | None = None) -> bool:
    return any(f".{k}." in f".{name}" for k in (keys if keys is not None else adapter_keys()))


def _unique_parameters(module: nn.Module):
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:  # tied weights (embeddings / lm_head) count once
            seen.add(id(p))
            yield name, p
