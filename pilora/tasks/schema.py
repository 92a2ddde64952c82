"""Typed task settings: one dataclass per task family, each ``task.*`` key declared once.

A family's schema names every key its task reads, with the key's type, its default and a short
help text (``setting(default, help, low=...)``). :meth:`TaskSettings.from_dict` builds it from the
composed task section (a plain dict, or any mapping): an unknown key is a :class:`ValueError`
listing the family's valid keys, and a value of the wrong type (or below its bound) is one naming
the key. Choices that depend on other modules (a prompt style, an evaluation mode, a selection
split) are checked by the task where it uses them.

The task YAMLs (``conf/task/**``) may still spell out a default: the composed config is the job's
identity (``job.json``, ``analysis.keys.config_key``), so a key that old jobs recorded stays in
their YAML; ``tests/test_task_schema.py`` checks that such a key holds the schema's default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

# task.metric_mode: which end of task.metric is best (records.best_and_final picks max or min, and
# hparams_search's direction follows it); anything else would pick the worst epoch silently
METRIC_MODES = ("max", "min")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, low: int | float | None = None, factory=None):
    """A schema field: its default (or ``factory`` for a mutable one; neither: required), a help
    text, and for numbers the smallest allowed value."""
    meta = {"help": help, "low": low}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def plain(value: Any) -> Any:
    """Mappings -> dicts and sequences -> lists, recursively (an OmegaConf node reads as a mapping or
    a sequence; nothing here imports OmegaConf)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """The keys every task family has."""

    name: str = setting(help="the task's name: folder names, records and tables")
    family: str = setting(help="the family that runs it (pilora.tasks.FAMILIES)")
    dataset: dict = setting(factory=dict, help="where the data lies: path, name, data_files, ... (read by the family)")
    splits: dict = setting(factory=dict, help="{train, validation, test: the data's split name}; unset: the same name")
    metric: str = setting("accuracy", help="the per-epoch metric the best epoch (and a sweep's objective) is chosen on")
    metric_mode: str = setting("max", help="max or min: which end of `metric` is best")
    test_limit: int | None = setting(None, low=1, help="score only the first N test examples (smoke runs set it)")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{key: help text}`` in declaration order."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{key: default}`` of the keys that have one."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_dict(cls, task_cfg: Mapping) -> "TaskSettings":
        cfg = plain(task_cfg)
        if not isinstance(cfg, dict):
            raise ValueError(f"the task section must be a mapping of settings, got {type(task_cfg).__name__}")
        where = f"task ({cfg.get('family')})" if cfg.get("family") else "task"
        valid = cls.keys()
        unknown = [k for k in cfg if k not in valid]
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(f'task.{k}' for k in unknown)} for task {cfg.get('name')!r}; "
                f"valid keys of {where}: {', '.join(valid)}"
            )
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in cfg:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"task {cfg.get('name')!r} does not set task.{f.name}, which {where} needs")
                continue
            _check(f.name, cfg[f.name], hints[f.name], f.metadata.get("low"))
        return cls(**cfg)

    def __post_init__(self):
        if self.metric_mode not in METRIC_MODES:
            raise ValueError(
                f"task.metric_mode={self.metric_mode!r} is not a metric mode: set task.metric_mode=max (a higher "
                f"task.metric is better, e.g. accuracy) or task.metric_mode=min (lower is better, e.g. loss)"
            )
        # a share of the train split held out: 0 holds nothing out, 1 leaves nothing to train on
        fraction = getattr(self, "holdout_fraction", None)
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"task.holdout_fraction must lie strictly between 0 and 1, got {fraction!r}")

    def as_dict(self) -> dict[str, Any]:
        """Every key, set or defaulted (plain values, a copy)."""
        return dataclasses.asdict(self)


def _check(key: str, value: Any, tp: Any, low) -> None:
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    if value is None:
        if optional:
            return
        raise ValueError(f"task.{key} must be set, got null")
    for kind in kinds:
        if _is(value, kind, low):
            return
    null = " or null" if optional else ""
    if kinds == [int]:
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"task.{key} must be an integer{bound}{null}, got {value!r}: set task.{key}=<integer>")
    if kinds == [bool]:
        raise ValueError(f"task.{key} must be true or false{null}, got {value!r}")
    if kinds == [float]:
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"task.{key} must be a number{bound}{null}, got {value!r}")
    names = {
        str: "a string",
        dict: "a mapping",
        list: "a list",
        int: "an integer",
        float: "a number",
        bool: "true/false",
    }
    wanted = " or ".join(names.get(getattr(k, "__origin__", k), str(k)) for k in kinds)
    raise ValueError(f"task.{key} must be {wanted}{null}, got {value!r}")


def _is(value: Any, kind: Any, low) -> bool:
    kind = typing.get_origin(kind) or kind
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and (low is None or value >= low)
    return isinstance(value, kind)
