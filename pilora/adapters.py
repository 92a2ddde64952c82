"""Adapters that stock PEFT loads onto the *pretrained* model, whatever the method.

Two methods need care beyond ``save_pretrained``:

* PiLoRA's stage-2 layer holds row-partitioned ``B`` blocks that stock PEFT cannot read; its
  update is written as the equivalent plain rank ``r + r'`` LoRA (:func:`pilora.export.export_lora`).
* PiSSA and MiLoRA move part of ``W0`` into the adapter at init (``W0 → W_res = W0 − s·B₀A₀``).
  Their trained ``(A, B)`` only reproduce the trained model on top of ``W_res``, which is not
  saved; loaded onto the pretrained ``W0`` they would be wrong. PEFT converts such an adapter to
  a plain LoRA on ``W0`` (``ΔW = s·(B A − B₀ A₀)``, rank ``2r``) from the adapter as it was at
  init (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``), so the init is
  saved right after it is made (:func:`save_initial_adapter`).
"""

from __future__ import annotations

import os

from torch import nn

INITIAL_ADAPTER_DIR = "adapter_init"  # PiSSA / MiLoRA: the adapter as initialised, for the conversion
_INITIAL_ATTR = "_pilora_initial_adapter"


def is_pilora(peft_model: nn.Module) -> bool:
    from .layer import RowPartitionedB

    return any(isinstance(m, RowPartitionedB) for m in peft_model.modules())


def save_initial_adapter(peft_model: nn.Module, path: str) -> str:
    """Save the adapter as initialised (call before training); later saves of this model are
    converted against it. Returns ``path``. Only meaningful for inits that mutate ``W0``."""
    peft_model.save_pretrained(path)
    setattr(peft_model, _INITIAL_ATTR, os.path.abspath(path))
    return path


def save_peft_adapter(peft_model: nn.Module, path: str) -> None:
    """Write ``path`` so that ``PeftModel.from_pretrained(<pretrained model>, path)`` reproduces
    ``peft_model``'s outputs: the PiLoRA export, the PiSSA/MiLoRA conversion, or PEFT's own save."""
    if is_pilora(peft_model):
        from .export import export_lora

        export_lora(peft_model, path)
        return
    initial = getattr(peft_model, _INITIAL_ATTR, None)
    if initial is not None:
        if not os.path.isdir(initial):
            raise FileNotFoundError(
                f"the initial adapter {initial!r} this model's conversion needs is gone; "
                "it is written when training starts (rerun with resume=false)"
            )
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        peft_model.save_pretrained(path, path_initial_model_for_weight_conversion=initial)
        # PEFT's conversion keeps only the LoRA tensors: put back what is trained in full
        # (modules_to_save, e.g. a classification head), or the reload would start a fresh head
        full = {
            k: v.detach().contiguous().cpu()
            for k, v in get_peft_model_state_dict(peft_model).items()
            if ".lora_" not in k
        }
        if full:
            file = os.path.join(path, "adapter_model.safetensors")
            save_file({**load_file(file), **full}, file, metadata={"format": "pt"})
        return
    peft_model.save_pretrained(path)
