"""PiSSA and MiLoRA: LoRA initialised from singular triplets of W0 (the principal ones, the minor
ones), the rest left in W_res. The init moves part of W0 into the adapter (``mutates_base``), so a
saved adapter is converted against the initial one to load onto the pretrained model
(:mod:`pilora.export`)."""

from __future__ import annotations

from .base import Method, register_init, register_method


def check_rank(layer, adapter, method: str) -> None:
    """An ``m × n`` weight has ``min(m, n)`` singular triplets: a larger rank cannot be taken from it
    (PEFT would build a short adapter that only fails when it is saved and converted)."""
    out_features, in_features = layer.get_base_layer().weight.shape
    r = int(layer.r[adapter])
    if r > min(out_features, in_features):
        raise ValueError(
            f"{method} takes r = {r} singular triplets of each target weight, but a {out_features}×{in_features} "
            f"target has only {min(out_features, in_features)}; lower method.r or leave that module out of "
            "method.target_modules"
        )


@register_init("pissa")
def pissa_init(layer, adapter, cfg=None):
    """PiSSA: principal r singular triplets in the adapter, the rest in W_res (PEFT's code)."""
    check_rank(layer, adapter, "PiSSA")
    layer.pissa_init(adapter, "pissa")


@register_init("milora")
def milora_init(layer, adapter, cfg=None):
    """MiLoRA: the adapter takes the *minor* (smallest) r singular triplets of W0.

    ``W0 = U Σ Vᵀ``; with the last r triplets ``(U_r, Σ_r, V_r)``: ``A = √(Σ_r/s) V_rᵀ``,
    ``B = U_r √(Σ_r/s)`` and ``W_res = W0 − s·B A``, so the output is unchanged at init.
    """
    import torch

    check_rank(layer, adapter, "MiLoRA")
    base = layer.get_base_layer()
    W = base.weight
    r, s = int(layer.r[adapter]), float(layer.scaling[adapter])
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("MiLoRA init needs a float base weight (initialise before quantising)")
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    Ur, Sr, Vhr = U[:, -r:], S[-r:] / s, Vh[-r:]
    A = torch.diag(Sr.sqrt()) @ Vhr
    B = Ur @ torch.diag(Sr.sqrt())
    layer.lora_A[adapter].weight.data = A.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = B.to(layer.lora_B[adapter].weight.dtype)
    base.weight.data = (W.float() - s * B @ A).to(W.dtype)


register_method("pissa", Method(init="pissa", mutates_base=True, rows=(("pissa", "PiSSA"),)))
register_method("milora", Method(init="milora", mutates_base=True, rows=(("milora", "MiLoRA"),)))
