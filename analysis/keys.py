"""Configuration identity: which records are seeds of one configuration.

Two records belong to the same configuration when their resolved configs agree on everything
except the keys in :data:`IGNORED` (seed, output folder, logging, data *locations*, the stage-1
file a job reused, evaluation batch size and similar bookkeeping). :func:`config_key` is a short
hash of the rest: records are averaged over seeds only within one ``config_key`` -- records that
differ in r, r', partition, model, learning rate, epochs, ... are never averaged together.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

#: Dotted config keys (prefixes) that do not distinguish configurations.
IGNORED = (
    "seed",
    "output_dir",
    "resume",
    "smoke",  # a dry run's switch (its records live in a throwaway folder), not a setting of the experiment
    "save_adapter",
    "sweep_name",
    "logger",
    "hydra",
    "method.importance_from",  # which stage-1 file was reused, not how it was made
    "method.partition.args.seed",  # random partitions follow the job seed (${seed})
    "method.chunk_rows",  # memory knob, numerically identical
    "method.rank_pattern",  # budget-matched ranks: an outcome of each seed's stage 1
    "method.snapshot_interval",  # how often the figures' |G̃| snapshot is pooled; H, ΣS, masks unchanged
    "model.path",  # hub id or local copy of the same model
    "task.dataset.path",
    "task.dataset.hub_id",
    "task.dataset.name",
    "task.dataset.data_dir",
    "task.dataset.data_files",
    "task.dataset.root",
    "task.dataset.train_file",
    "task.eval_sets",  # data locations
    "task.eval_batch_size",
    "trainer.logging_steps",
    "trainer.disable_tqdm",
    "trainer.per_device_eval_batch_size",
    "trainer.save_strategy",
    "trainer.save_steps",
    "trainer.save_total_limit",
    "trainer.dataloader_num_workers",
    "trainer.dataloader_pin_memory",
    "trainer.report_to",
    "trainer.run_name",
    "trainer.logging_dir",
)


def _norm(v):
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``; lists stay lists."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = _norm(v)
    return out


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in ignore)


def config_items(config: dict, ignore: Iterable[str] = IGNORED) -> dict[str, Any]:
    """The flattened config without the keys that do not distinguish configurations."""
    return {k: v for k, v in sorted(flatten(config).items()) if not _ignored(k, ignore)}


def config_key(config: dict, ignore: Iterable[str] = IGNORED) -> str:
    """Short stable hash of :func:`config_items` (equal for the seeds of one configuration)."""
    blob = json.dumps(config_items(config, ignore), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def partition_label(name, args) -> str | None:
    if not name:
        return None
    args = {k: v for k, v in (args or {}).items() if k != "seed"}
    return name + ("(" + ", ".join(f"{k}={_norm(v)}" for k, v in sorted(args.items())) + ")" if args else "")
