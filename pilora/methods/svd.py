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
    from peft.utils.other import transpose

    check_rank(layer, adapter, "MiLoRA")
    base = layer.get_base_layer()
    flip = bool(getattr(layer, "fan_in_fan_out", False))  # Conv1D (GPT-2) stores W0 as n × m
    W = transpose(base.weight.detach(), flip)
    r, s = int(layer.r[adapter]), float(layer.scaling[adapter])
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("MiLoRA init needs a float base weight (initialise before quantising)")
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    Ur, Sr, Vhr = U[:, -r:], S[-r:] / s, Vh[-r:]
    A = torch.diag(Sr.sqrt()) @ Vhr
    B = Ur @ torch.diag(Sr.sqrt())
    layer.lora_A[adapter].weight.data = A.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = B.to(layer.lora_B[adapter].weight.dtype)
    minor = s * B @ A
    residual = (W.float() - minor).to(W.dtype)
    if W.dtype != torch.float32:
        _warn_rounding(residual, minor, W)
    base.weight.data = transpose(residual, flip).contiguous()


ROUNDING_WARN = 0.1  # share of s·B·A that W_res's rounding may lose before MiLoRA warns
_warned = False


def _warn_rounding(residual, minor, W) -> None:
    """The minor triplets are W0's smallest: rounded into a half-precision W_res, W_res + s·B·A can
    miss W0 by a large share of s·B·A (bfloat16: ~1/3 on a random 1024² weight, float16 ~4 %), so the
    model at init is not W0 and the saved adapter does not reproduce the trained one. Said once."""
    global _warned
    lost = float((residual.float() + minor - W.float()).norm() / minor.norm().clamp_min(1e-30))
    if lost > ROUNDING_WARN and not _warned:
        import logging

        _warned = True
        logging.getLogger("pilora").warning(
            "MiLoRA: rounding W_res = W0 - s·B·A to %s loses %.0f%% of the minor component s·B·A "
            "(first layer over %.0f%%); load the model in float32 (model.dtype=float32) for a faithful init",
            str(W.dtype).replace("torch.", ""),
            100 * lost,
            100 * ROUNDING_WARN,
        )


register_method("pissa", Method(init="pissa", mutates_base=True, rows=(("pissa", "PiSSA"),)))
register_method("milora", Method(init="milora", mutates_base=True, rows=(("milora", "MiLoRA"),)))
