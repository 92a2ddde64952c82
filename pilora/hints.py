"""The "did you mean" part of an error that names an unknown key or name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word, candidates: Iterable, *, prefix: str = "", n: int = 1, quote: bool = False) -> str:
    """``" (did you mean <prefix><candidate>?)"`` for the (up to ``n``) candidates closest to ``word``
    (difflib's ratio ≥ 0.6), or ``""`` when none is close; ``quote`` writes them as ``repr``."""
    close = difflib.get_close_matches(str(word), sorted(str(c) for c in candidates), n=n)
    if not close:
        return ""
    return f" (did you mean {', '.join(repr(prefix + c) if quote else prefix + c for c in close)}?)"
