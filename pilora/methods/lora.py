"""LoRA (Hu et al., 2022) and the variants that differ from it only in ``LoraConfig``: rsLoRA
(scaling α/√r) and DoRA (a learned magnitude per output row, its own forward). LoRA is the
method a budget match trains (``conf/method/lora_matched.yaml``, :mod:`pilora.methods.budget`)."""

from __future__ import annotations

from .base import Method, register_init, register_method


@register_init("default")
def default_init(layer, adapter, cfg=None):
    """PEFT's LoRA init (A Kaiming-uniform, B = 0), already applied at injection."""


register_method(
    "lora",
    Method(matchable=True, rows=(("lora", "LoRA"), ("lora_matched", "LoRA (budget-matched)"))),
)
register_method("rslora", Method({"use_rslora": True}, rows=(("rslora", "rsLoRA"),)))
register_method(
    "dora",
    Method(
        {"use_dora": True},
        own_forward="DoRA",  # fused_forward=true raises
        adapter_keys=("lora_A", "lora_B", "lora_magnitude_vector"),
        rows=(("dora", "DoRA"),),
    ),
)
