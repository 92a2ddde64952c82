"""One run record (``results.json``, schema 1) -> one flat row of the analysis DataFrame.

:func:`record_row` checks a record and flattens it (raising :class:`RecordError` with a one-line
reason when it is unusable); :func:`frame` puts rows into a DataFrame with :data:`BASE_COLUMNS`.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import pandas as pd

from pilora.runner.records import SCHEMA

from .keys import config_items, config_key, partition_label

#: Columns every frame has, also when it is empty (so callers can filter without KeyErrors).
BASE_COLUMNS = [
    "task",
    "family",
    "method",
    "model",
    "seed",
    "metric",
    "r",
    "alpha",
    "supplementary_r",
    "supplementary_alpha",
    "stage1_r",
    "importance_interval",
    "stage1_max_steps",
    "importance_from",
    "partition",
    "partition_args",
    "partition_label",
    "dominant_fraction",
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "params_trainable",
    "params_total",
    "params_adapter",
    "params_backbone",
    "share",
    "adapter_share",
    "adapter_share_of_backbone",
    "git_revision",
    "git_dirty",
    "time_total_s",
    "steps",
    "peak_memory_mb",
    "device",
    "n_gpus",
    "importance_file",
    "config_key",
    "config",
    "source",
    "path",
    "dir",
    "mtime",
]


class RecordError(ValueError):
    """A record this reader cannot use (the message says why)."""


def say(msg: str) -> None:
    """One line to stderr: the warnings and notes of this package (never a traceback)."""
    print(msg, file=sys.stderr, flush=True)


def _need(rec: dict, dotted: str):
    cur: Any = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise RecordError(f"missing key {dotted!r}")
        cur = cur[part]
    return cur


# numeric fields of a record (dotted; None allowed): a mistyped one makes the record unusable
NUMERIC = (
    "seed",
    "steps",
    "peak_memory_mb",
    "params.trainable",
    "params.total",
    "params.adapter",
    "params.backbone",
    "params.share",
    "params.adapter_share",
    "params.adapter_share_of_backbone",
    "pilora.dominant_fraction",
    "config.method.r",
    "config.method.supplementary_r",
    "config.method.stage1_r",
)


def _check_numbers(rec: dict) -> None:
    for dotted in NUMERIC + tuple(f"timing.{k}" for k in (rec.get("timing") or {})):
        cur: Any = rec
        for part in dotted.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None and (isinstance(cur, bool) or not isinstance(cur, (int, float))):
            raise RecordError(f"{dotted} is {cur!r} ({type(cur).__name__}), not a number")


# the range of a metric, by how its name ends (eval_accuracy, test_boolq_accuracy, eval_f1, ...)
METRIC_RANGES = (
    (("accuracy", "f1", "precision", "recall"), (0.0, 1.0)),
    (("matthews_correlation", "mcc", "pearson", "spearmanr", "combined_score"), (-1.0, 1.0)),
    (("loss", "no_match"), (0.0, math.inf)),
)


def _check_metrics(rec: dict) -> None:
    """Every value of ``metrics.final`` / ``best`` / ``test`` is a finite number inside its metric's
    range: a string, NaN or 7.5 for an accuracy (750 %) makes the record unusable (skipped with a
    warning naming the file) rather than silently dropped from, or averaged into, a table."""
    for which in ("final", "best", "test"):
        for key, value in (rec["metrics"].get(which) or {}).items():
            where = f"metrics.{which}.{key}"
            if value is None:  # not measured: no column, nothing averaged
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecordError(f"{where} is {value!r} ({type(value).__name__}), not a number")
            if not math.isfinite(value):
                raise RecordError(f"{where} is {value!r}, not a finite number")
            for suffixes, (low, high) in METRIC_RANGES:
                if key.endswith(suffixes) and not low <= value <= high:
                    raise RecordError(f"{where} is {value!r}, outside the metric's range [{low:g}, {high:g}]")


def _used_method_keys(section: dict) -> dict:
    """``config.method`` without the keys its method does not use. Records hold only those
    (``pilora.methods.recorded_section``); older records, and W&B configs, also held keys such as
    ``supplementary_r`` of a LoRA run, which would otherwise split one configuration in two."""
    from pilora.methods import recorded_section

    return recorded_section(section)


def record_row(rec: Any, path: str, source: str = "file", mtime: float | None = None) -> dict:
    """Flatten one record; raise :class:`RecordError` (with a one-line reason) if unusable."""
    if not isinstance(rec, dict):
        raise RecordError("not a JSON object")
    schema = rec.get("schema")
    if schema != SCHEMA:
        raise RecordError(
            f"record schema {schema!r}, this reader handles schema {SCHEMA} (re-run the job or convert the record)"
        )
    if rec.get("status") != "complete":
        raise RecordError(f"status {rec.get('status')!r}, not 'complete'")
    for key in (
        "task",
        "method",
        "model",
        "seed",
        "config",
        "metrics.final",
        "metrics.best",
        "params.adapter",
        "params.adapter_share",
    ):
        _need(rec, key)
    cfg = rec["config"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method"), dict):
        raise RecordError("missing key 'config.method'")
    _check_numbers(rec)
    _check_metrics(rec)
    cfg = {**cfg, "method": _used_method_keys(cfg["method"])}
    m, tr = cfg["method"], cfg.get("trainer") or {}
    pil = rec.get("pilora") or {}
    part = m.get("partition") if isinstance(m.get("partition"), dict) else {}
    # the partition of a PiLoRA run, or the one a budget-matched LoRA took its ranks from
    pname = (
        pil.get("partition", part.get("name"))
        if rec["method"] == "pilora"
        else part.get("name")
        if rec["method"] == "lora_matched"
        else None
    )
    pargs = dict(pil.get("partition_args", part.get("args")) or {}) if pname else {}
    params, timing, git = rec["params"], rec.get("timing") or {}, rec.get("git") or {}
    row = {
        "task": rec["task"],
        "family": rec.get("family", (cfg.get("task") or {}).get("family")),
        "method": rec["method"],
        "model": rec["model"],
        "seed": int(rec["seed"]),
        "metric": rec.get("metric", (cfg.get("task") or {}).get("metric", "accuracy")),
        "r": m.get("r"),
        "alpha": m.get("alpha"),
        "supplementary_r": m.get("supplementary_r"),
        "supplementary_alpha": m.get("supplementary_alpha"),
        "stage1_r": m.get("stage1_r"),
        "importance_interval": m.get("importance_interval"),
        "stage1_max_steps": (m.get("stage1") or {}).get("max_steps"),
        "importance_from": m.get("importance_from"),
        "partition": pname,
        "partition_args": pargs,
        "partition_label": partition_label(pname, pargs),
        "dominant_fraction": pil.get("dominant_fraction"),
        "lr": tr.get("learning_rate"),
        "epochs": tr.get("num_train_epochs"),
        "max_steps": tr.get("max_steps"),
        "batch_size": tr.get("per_device_train_batch_size"),
        "params_trainable": params.get("trainable"),
        "params_total": params.get("total"),
        "params_adapter": params.get("adapter"),
        "params_backbone": params.get("backbone"),
        "share": params.get("share"),
        "adapter_share": params.get("adapter_share"),
        "adapter_share_of_backbone": params.get("adapter_share_of_backbone"),
        "git_revision": git.get("revision"),
        "git_dirty": git.get("dirty"),
        "steps": rec.get("steps"),
        "peak_memory_mb": rec.get("peak_memory_mb"),
        "device": rec.get("device"),
        # GPUs the job used: n_gpus if the record has it, else its world_size (DDP processes, one GPU
        # each); neither -> None and the cost table counts 1
        "n_gpus": rec.get("n_gpus", rec.get("world_size")),
        "importance_file": pil.get("importance_file"),
        "config_key": config_key(cfg),
        "config": config_items(cfg),
        "source": source,
        "path": path,
        "dir": os.path.dirname(path) if source == "file" else None,
        # which of two records of one configuration and seed is newer (a W&B row: its run's start time)
        "mtime": os.path.getmtime(path) if source == "file" and os.path.exists(path) else mtime,
        "wandb_id": (rec.get("wandb") or {}).get("id"),
        # the number the task names as its headline (pilora.tasks.base.Task.headline); None in old records
        "headline_metric": ((rec.get("evaluation") or {}).get("headline") or {}).get("metric"),
        "headline_from": ((rec.get("evaluation") or {}).get("headline") or {}).get("from"),
    }
    for k, v in pargs.items():
        if k != "seed":
            row[f"partition_{k}"] = v
    for k, v in timing.items():
        row[f"time_{k}"] = v
    for k, v in (rec.get("budget_match") or {}).items():  # budget-matched LoRA (method label lora_matched)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[f"budget_{k}"] = v
    for which in ("final", "best"):
        for k, v in (rec["metrics"].get(which) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"{which}_{k}"] = v
    for k, v in (rec["metrics"].get("test") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k if k.startswith("test_") else f"test_{k}"] = v
    return row


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in BASE_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    lead = [c for c in BASE_COLUMNS if c in df.columns]
    return df[lead + sorted(c for c in df.columns if c not in lead)].reset_index(drop=True)
