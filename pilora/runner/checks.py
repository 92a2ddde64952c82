"""Checks of config values that would otherwise fail deep inside a library with a traceback, or
be silently changed (PEFT truncates ``r=2.5`` to 2 while the record would say 2.5) or ignored."""

from __future__ import annotations

from ..methods import integer_bounds

# integer keys of ``method``: (name, smallest allowed value), from their declarations (pilora.methods.config)
_METHOD_INTS = integer_bounds()


def _int_or_raise(key: str, value, low: int) -> None:
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok or value < low:
        raise ValueError(
            f"{key} must be an integer >= {low}, got {value!r} ({type(value).__name__}); set {key}=<integer>"
        )


def check_values(cfg: dict) -> None:
    """Raise a ValueError naming the key for a non-integer seed or method rank, a budget-matched
    LoRA whose r' exceeds r, or a ``model.path`` that the model would ignore."""
    from .config import checked_int

    checked_int("seed", cfg.get("seed", 0))  # the folder name's rule; its range: pilora.runner.validate
    method = cfg.get("method") or {}
    for key, low in _METHOD_INTS:
        if method.get(key) is not None:
            _int_or_raise(f"method.{key}", method[key], low)
    if (
        method.get("match_budget")
        and method.get("r") is not None
        and int(method.get("supplementary_r") or 0) > int(method["r"])
    ):
        raise ValueError(
            f"method.supplementary_r={method['supplementary_r']} exceeds method.r={method['r']}: "
            f"{method.get('label') or 'lora_matched'} copies the budget of a PiLoRA run, whose "
            "supplementary rank r' must satisfy 0 <= r' <= r; lower method.supplementary_r or "
            "raise method.r"
        )
    model = cfg.get("model") or {}
    if model.get("path") and (model.get("from_config") or (model.get("openclip") or {}).get("model_cfg")):
        raise ValueError(
            f"model.path={model['path']!r} is ignored by model {model.get('name')!r}: it is built with "
            "random weights from its inline config (model.from_config), no checkpoint is loaded. "
            "Drop the model.path override, or choose a pretrained model (e.g. model=roberta-large, "
            "model=clip-vit-b32, model=llama2-7b) and set its model.path"
        )
