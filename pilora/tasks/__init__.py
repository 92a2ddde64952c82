"""Task families: how a task's data is loaded, which model head it needs, and how it is scored.

A task config (``conf/task/**.yaml``) names its ``family``; the family class turns the config
into datasets ready for ``transformers.Trainer``, a fresh pretrained model, and metrics.
"""

from __future__ import annotations

from . import classification, commonsense, generation, vision  # noqa: F401  (register the families)
from .base import FAMILIES, DataError, Task, make_task, register_family

__all__ = ["FAMILIES", "DataError", "Task", "make_task", "register_family"]
