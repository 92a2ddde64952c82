"""Configuration identity: which records are seeds of one configuration.

Two records belong to the same configuration when their resolved configs agree on everything
except the keys in :data:`IGNORED` (seed, output folder, logging, data *locations*, the stage-1
file a job reused, evaluation batch size and similar bookkeeping). :func:`config_key` is a short
hash of the rest: records are averaged over seeds only within one ``config_key`` -- records that
differ in r, r', partition, model, learning rate, epochs, ... are never averaged together.

A key whose null means "derived from other keys" (:data:`DERIVED`: the stage-1 rank, null = r)
holds the value the job ran with, so a record that spells the value out and one that left it null
are one configuration; :func:`at_default` says whether a key holds only what leaving it unset gives.
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


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def same_value(a, b) -> bool:
    """Config values compared as configurations are compared (numbers to float precision)."""
    if _number(a) and _number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


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


def _shared_scale_alpha(items: dict):
    """α' that scales the supplementary adapter as the dominant one, s = α/r (what
    ``supplementary_alpha: null`` does, pilora.layer.supplementary_scale): α' = α·r'/r."""
    alpha, r, r_s = (items.get(f"method.{k}") for k in ("alpha", "r", "supplementary_r"))
    return _norm(alpha * r_s / r) if all(map(_number, (alpha, r, r_s))) and r else None


#: The keys of ``pilora.methods.config.MethodConfig`` whose null means "derived from other keys",
#: with that derivation (their help text). fig5_rank sets ``stage1_r: 32`` where Table 1's runs leave
#: it null (= r): at r = 32 both are one training, and one configuration here. Not derived here:
#: ``fused_forward`` (PiLoRA's null fuses stage 2 only, which no explicit value does),
#: ``importance_checks`` (a set N replaces K by stage-1 steps // N, not by a config value),
#: ``modules_to_save`` (the task's head, not in the config) and ``label`` (a row's name).
DERIVED = {
    "method.stage1_r": lambda items: items.get("method.r"),
    "method.supplementary_alpha": _shared_scale_alpha,
    "method.target_modules": lambda items: items.get("model.target_modules"),
}


def config_items(config: dict, ignore: Iterable[str] = IGNORED) -> dict[str, Any]:
    """The flattened config without the keys that do not distinguish configurations, a null
    :data:`DERIVED` key replaced by the value it stands for."""
    items = flatten(config)
    for k, derive in DERIVED.items():
        if k in items and items[k] is None:
            items[k] = derive(items)
    return {k: v for k, v in sorted(items.items()) if not _ignored(k, ignore)}


def at_default(items: dict, key: str) -> bool:
    """Whether ``items`` (:func:`config_items`) holds for ``key`` only what leaving it unset gives:
    nothing, null, or a :data:`DERIVED` key's derived value (stage-1 r = r). Such a value is no
    setting of its own: it neither tells configurations apart nor departs from the paper's."""
    value = items.get(key)
    return value is None or (key in DERIVED and same_value(value, DERIVED[key](items)))


def config_key(config: dict, ignore: Iterable[str] = IGNORED) -> str:
    """Short stable hash of :func:`config_items` (equal for the seeds of one configuration)."""
    blob = json.dumps(config_items(config, ignore), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def partition_label(name, args) -> str | None:
    if not name:
        return None
    args = {k: v for k, v in (args or {}).items() if k != "seed"}
    return name + ("(" + ", ".join(f"{k}={_norm(v)}" for k, v in sorted(args.items())) + ")" if args else "")
