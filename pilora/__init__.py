"""PiLoRA: parameter-importance-aware low-rank adaptation.

Stage 1 (:mod:`pilora.importance`) trains a plain LoRA briefly and accumulates per-row
importance from the LoRA gradients; a partition (:mod:`pilora.partition`) turns it into
dominant-row masks; stage 2 (:mod:`pilora.layer`) trains rank-r adapters on dominant rows and
rank-r' adapters on the rest. :func:`prepare_model` builds any method's model to train.

The names below load on first use (PEP 562), so that ``import pilora.runner.config`` or
``pilora.methods`` (all that ``run.py`` needs to compose and check a config) does not import
torch, transformers and PEFT: a mistyped override, ``--help`` and tab completion answer at once.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

# ``partition`` is also a submodule's name, and importing ``pilora.partition`` sets the package's
# attribute of that name to the module: the function is bound here, eagerly, before that can
# happen (the module loads without torch)
from .partition import PARTITIONS, dominant_fractions, partition

# PEFT 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing`, which
# warns for every model wrapped (each stage of each job: Python's "once"/"default" actions repeat
# it whenever a library changes the warning filters). Nothing on our side can change it: ignored
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _installed_version() -> str:
    """The version pip installed (pyproject.toml's ``project.version``); ``0+unknown`` for a
    source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pilora")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()

_EXPORTS = {
    "export": ("export_lora",),
    "importance": ("ImportanceAccumulator", "ImportanceStats", "ModuleStats", "approx_full_grad", "row_scores"),
    "layer": ("RowPartitionedB", "load_adapter", "pilora_masks", "save_adapter", "to_pilora"),
    "methods": ("INITS", "METHODS", "MethodConfig", "lora_config", "prepare_model"),
    "params": ("ParamCount", "count_parameters"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_HOME, "PARTITIONS", "__version__", "dominant_fractions", "partition"]


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'pilora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .export import export_lora  # noqa: F401
    from .importance import ImportanceAccumulator, ImportanceStats, ModuleStats, approx_full_grad, row_scores  # noqa: F401
    from .layer import RowPartitionedB, load_adapter, pilora_masks, save_adapter, to_pilora  # noqa: F401
    from .methods import INITS, METHODS, MethodConfig, lora_config, prepare_model  # noqa: F401
    from .params import ParamCount, count_parameters  # noqa: F401
