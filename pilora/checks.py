"""Checks of config values that would otherwise fail deep inside a library with a traceback, or
be silently changed (PEFT truncates ``r=2.5`` to 2 while the record would say 2.5)."""

from __future__ import annotations

# integer keys of ``method``: (name, smallest allowed value)
_METHOD_INTS = (("r", 1), ("supplementary_r", 0), ("stage1_r", 1), ("importance_interval", 1))


def _int_or_raise(key: str, value, low: int) -> None:
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r} ({type(value).__name__}); "
                         f"set {key}=<integer>")


def check_values(cfg: dict) -> None:
    """Raise a ValueError naming the key for a non-integer seed or method rank."""
    _int_or_raise("seed", cfg.get("seed", 0), -2**63)
    method = cfg.get("method") or {}
    for key, low in _METHOD_INTS:
        if method.get(key) is not None:
            _int_or_raise(f"method.{key}", method[key], low)
