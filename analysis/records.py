"""Run records -> one pandas DataFrame (one row per job).

Every job writes ``<output_dir>/results.json`` (schema 1, :mod:`pilora.runner.records`). ``load_records``
walks one or more results trees (Hydra's ``outputs/`` and ``multirun/`` by default) and flattens
each record into a row; ``load_wandb`` builds the same frame from a W&B project, pulled once into
a local JSON cache that it falls back to when the API cannot be reached.

Grouping rule (used by the tables and figures): two records belong to the same configuration
when their resolved configs agree on everything except the keys in :data:`IGNORED` (seed,
output folder, logging, data *locations*, the stage-1 file a job reused, evaluation batch size
and similar bookkeeping). ``config_key`` is a short hash of the rest: records are averaged over
seeds only within one ``config_key`` -- records that differ in r, r', partition, model, learning
rate, epochs, ... are never averaged together. Two records with the same ``config_key`` *and*
seed are duplicates (e.g. an r' sweep point that repeats the main run through
``method.importance_from``); :func:`drop_duplicates` keeps one (the one that ran its own stage 1,
else the newest) and says which it ignored.

Command line (lists records; ``--value`` prints one field, e.g. a stage-1 file to reuse)::

    python -m analysis.records --root multirun/table1_llama2 \
        --query "method == 'pilora' and seed == 0" --value importance_file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Iterable

import pandas as pd

from pilora.runner.records import RECORD, SCHEMA, atomic_write_json, find_records

DEFAULT_ROOTS = ("outputs", "multirun")

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


# ----------------------------------------------------------------------------- config identity


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


# ----------------------------------------------------------------------------- record -> row


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
    (("matthews_correlation", "pearson", "spearmanr", "combined_score"), (-1.0, 1.0)),
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


def record_row(rec: Any, path: str, source: str = "file") -> dict:
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
        "mtime": os.path.getmtime(path) if source == "file" and os.path.exists(path) else None,
        "wandb_id": (rec.get("wandb") or {}).get("id"),
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


# ----------------------------------------------------------------------------- local trees


def _as_list(roots) -> list[str]:
    if roots is None:
        return list(DEFAULT_ROOTS)
    if isinstance(roots, (str, os.PathLike)):
        return [os.fspath(roots)]
    return [os.fspath(r) for r in roots]


def find_record_files(roots) -> list[str]:
    """Every ``results.json`` under ``roots`` (a folder, a list, or ``None`` for the defaults)."""
    return find_records(_as_list(roots))


def load_records(roots=None, *, dedupe: bool = True, quiet: bool = False) -> pd.DataFrame:
    """All usable records under ``roots`` (a folder, a list of folders, or ``None`` for
    ``outputs/`` and ``multirun/``) as one DataFrame; unusable files are skipped with one warning
    line each (also listed in ``df.attrs["skipped"]``)."""
    roots = _as_list(roots)
    rows, skipped = [], []
    missing = [r for r in roots if not os.path.exists(r)]
    for path in find_record_files([r for r in roots if os.path.exists(r)]):
        try:
            with open(path) as f:
                rec = json.load(f)
            rows.append(record_row(rec, path))
        except (OSError, json.JSONDecodeError) as err:
            skipped.append((path, f"unreadable ({type(err).__name__}: {err})"))
        except RecordError as err:
            skipped.append((path, str(err)))
        except Exception as err:  # a record of an unexpected shape must not stop the others
            skipped.append((path, f"unexpected content ({type(err).__name__}: {err})"))
    if not quiet:
        for path, why in skipped:
            say(f"warning: skipping {path}: {why}")
    df = frame(rows)
    if dedupe:
        df = drop_duplicates(df, quiet=quiet)
    if not quiet and df.empty:
        where = ", ".join(roots)
        extra = f" ({', '.join(missing)}: no such folder)" if missing else ""
        say(
            f"no usable results.json records under {where}{extra}; run the experiments first "
            "(experiments/README.md) or point --root at a results tree"
        )
    df.attrs.update(roots=roots, skipped=skipped, missing_roots=missing)
    return df


def _revision_label(rev, dirty) -> str:
    return (str(rev)[:10] if isinstance(rev, str) and rev else "unknown") + (" (dirty)" if dirty is True else "")


def check_revisions(df: pd.DataFrame, revision: str | None = None, quiet: bool = False) -> pd.DataFrame:
    """``revision`` (a hash or its prefix): keep only that git revision's records. Otherwise warn
    when records averaged together (one configuration, several seeds) come from different git
    revisions or from a tree with uncommitted changes (``git.dirty``): their code may differ.
    The configurations concerned are listed in ``df.attrs["mixed_revisions"]``."""
    if df.empty:
        df.attrs.setdefault("mixed_revisions", [])
        return df
    revs = df["git_revision"].where(df["git_revision"].notna(), None)
    if revision:
        keep = revs.map(lambda r: isinstance(r, str) and r.startswith(revision))
        out = df[keep.astype(bool)].reset_index(drop=True)
        out.attrs.update(df.attrs)
        out.attrs["mixed_revisions"] = []
        if not quiet:
            present = sorted({_revision_label(r, None) for r in revs})
            say(
                f"note: --revision {revision}: {len(out)} of {len(df)} record(s) kept"
                + ("" if len(out) else f"; the records' revisions are {', '.join(present)}")
            )
        return out
    mixed = []
    for key, group in df.groupby("config_key", sort=True):
        if len(group) < 2:
            continue
        labels = sorted({_revision_label(r, d) for r, d in zip(group["git_revision"], group["git_dirty"])})
        if len(labels) > 1 or any(d is True for d in group["git_dirty"]):
            first = group.iloc[0]
            mixed.append(
                {
                    "config_key": key,
                    "revisions": labels,
                    "paths": list(group["path"]),
                    "what": f"{first['task']}/{first['model']}/{first['method']}",
                }
            )
    if mixed and not quiet:
        say(
            f"warning: {len(mixed)} configuration(s) average records from different code (other git "
            "revisions, or a tree with uncommitted changes):"
        )
        for m in mixed:
            say(f"  {m['what']} [{m['config_key']}]: {', '.join(m['revisions'])}: {', '.join(map(str, m['paths']))}")
        say("  pass --revision REV to use one revision's records, or rerun them from one committed revision")
    df.attrs["mixed_revisions"] = mixed
    return df


def drop_duplicates(df: pd.DataFrame, quiet: bool = False) -> pd.DataFrame:
    """Keep one record per (config_key, seed): the one that ran its own stage 1, else the newest."""
    if df.empty:
        df.attrs.setdefault("duplicates", [])
        return df
    order = df.assign(_reused=df["importance_from"].notna(), _mtime=df["mtime"].fillna(0).astype(float))
    order = order.sort_values(["_reused", "_mtime", "path"], ascending=[True, False, True])
    dup = order.duplicated(["config_key", "seed"], keep="first")
    dropped = []
    for idx in order.index[dup]:
        twin = order[(order.config_key == df.at[idx, "config_key"]) & (order.seed == df.at[idx, "seed"]) & ~dup]
        dropped.append((df.at[idx, "path"], twin["path"].iloc[0]))
        if not quiet:
            say(f"note: ignoring {df.at[idx, 'path']}: same configuration and seed as {twin['path'].iloc[0]}")
    out = df.drop(index=order.index[dup]).reset_index(drop=True)
    out.attrs.update(df.attrs)
    out.attrs["duplicates"] = dropped
    return out


# ----------------------------------------------------------------------------- scores


def score(df: pd.DataFrame, which: str = "best") -> pd.Series:
    """The headline number of each record (a fraction): commonsense -> ``test_avg_accuracy``,
    vision -> ``test_accuracy`` (test split), classification/GLUE -> validation
    ``<which>_eval_<metric>`` (``which`` = best | final epoch)."""
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', not {which!r}")
    out = pd.Series(float("nan"), index=df.index, dtype=float)
    for idx, row in df.iterrows():
        fam = row.get("family")
        if fam == "generation":
            col = "test_avg_accuracy"
        elif fam == "vision":
            col = "test_accuracy"
        else:
            col = f"{which}_eval_{row.get('metric') or 'accuracy'}"
        v = row.get(col)
        out[idx] = float(v) if v is not None and not pd.isna(v) else float("nan")
    return out


def score_label(families: Iterable[str], which: str = "best") -> str:
    fams = set(families)
    parts = []
    if "generation" in fams:
        parts.append("commonsense: mean test accuracy over the test sets")
    if "vision" in fams:
        parts.append("vision: test accuracy")
    if fams - {"generation", "vision"}:
        parts.append(f"classification: validation accuracy at the {which} epoch")
    return "; ".join(parts) or "accuracy"


# ----------------------------------------------------------------------------- W&B


def _cache_file(cache_dir: str, project: str, entity: str | None, filters: dict | None) -> str:
    tag = ""
    if filters:
        tag = "__" + hashlib.sha1(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"{entity or 'default'}__{project}{tag}.json")


def _plain(x):
    return json.loads(json.dumps(x, default=str))


class WandbSourceError(ValueError):
    """A W&B source that names no runs (unknown project, empty folder); the message says what to do."""


_NOT_FOUND = ("could not find", "not found", "does not exist", "404")


def _pull(project: str, entity: str | None, filters: dict | None, api, artifact_dir: str | None = None) -> list[dict]:
    if api is None:
        import wandb

        api = wandb.Api(timeout=30)
    where = f"{entity}/{project}" if entity else project
    try:
        runs = list(api.runs(where, filters=filters or {}))
    except Exception as err:
        if any(s in str(err).lower() for s in _NOT_FOUND):
            raise WandbSourceError(
                f"W&B project {where!r} not found ({str(err).splitlines()[0]}); check the "
                "ENTITY/PROJECT spelling (wandb.ai/<entity>/<project>) and that you are "
                "logged in to an account that can see it"
            ) from err
        raise
    items = []
    for run in runs:
        summary = getattr(run, "summary", {}) or {}
        summary = getattr(summary, "_json_dict", summary)
        item = {
            "id": run.id,
            "name": getattr(run, "name", None),
            "state": getattr(run, "state", None),
            "path": "/".join(getattr(run, "path", []) or [project, run.id]),
            "commit": getattr(run, "commit", None),
            "config": _plain(dict(run.config or {})),
            "summary": _plain(dict(summary)),
            "record": None,
        }
        item["artifact_files"] = _download_artifacts(run, os.path.join(artifact_dir or ".", run.id))
        results = item["artifact_files"].get(RECORD)
        if results:
            with open(results) as f:
                item["record"] = json.load(f)
        else:
            item["record"] = _record_file(run)
        items.append(item)
    return items


def _download_artifacts(run, root: str) -> dict:
    """``{file name: local path}`` of the run's ``results`` artifact (results.json, importance.pt)."""
    files = {}
    try:
        logged = list(run.logged_artifacts())
    except Exception:  # runs logged before artifacts existed, or API objects without them
        return files
    for art in logged:
        if getattr(art, "type", None) != "results":
            continue
        folder = art.download(root=os.path.join(root, art.type))
        for name in os.listdir(folder):
            files[name] = os.path.abspath(os.path.join(folder, name))
    return files


def _record_file(run) -> dict | None:
    """The job's own results.json when it was uploaded with the run (full record), else None."""
    try:
        for f in run.files():
            if os.path.basename(f.name) == RECORD:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    f.download(root=tmp, replace=True)
                    with open(os.path.join(tmp, f.name)) as fh:
                        return json.load(fh)
    except Exception:  # files are optional; the summary still gives a partial record
        return None
    return None


def wandb_record(item: dict) -> dict:
    """A W&B run (as cached) -> a schema-1 record: the uploaded results.json if there is one,
    otherwise built from the run's config and summary (``final/``, ``best/``, ``test/``,
    ``params/``, ``pilora/``, ``timing/`` keys; ``eval/`` as a fallback for final)."""
    if item.get("record"):
        return _with_artifacts(item["record"], item)
    cfg, summ = _hydra_config(item.get("config") or {}), item.get("summary") or {}
    if "schema" in summ and "metrics" in summ:  # the summary is the record (pilora.runner.wandb)
        rec = {k: v for k, v in summ.items() if not k.startswith("_") and k not in ("label", "T")}
        rec.update(config=cfg, status="complete" if item.get("state") in (None, "finished") else item.get("state"))
        return _with_artifacts(rec, item)
    task, method, model = cfg.get("task") or {}, cfg.get("method") or {}, cfg.get("model") or {}
    groups: dict[str, dict] = {g: {} for g in ("final", "best", "test", "params", "pilora", "timing")}
    evals = {}
    for k, v in summ.items():
        head, _, tail = k.partition("/")
        if head in groups and tail:
            groups[head][tail if head != "test" or tail.startswith("test_") else f"test_{tail}"] = v
        elif head == "eval" and tail:
            evals[f"eval_{tail}"] = v
        elif k.startswith("test_"):
            groups["test"][k] = v
    final = groups["final"] or evals
    state = item.get("state")
    return {
        "schema": SCHEMA,
        "status": "complete" if state in (None, "finished") else state,
        "task": task.get("name"),
        "family": task.get("family"),
        "method": method.get("label") or method.get("name"),
        "model": model.get("name"),
        "seed": cfg.get("seed"),
        "metric": task.get("metric", "accuracy"),
        "config": cfg,
        "git": {"revision": item.get("commit"), "dirty": None},
        "metrics": {"final": final, "best": groups["best"] or {}, "test": groups["test"]},
        "params": groups["params"],
        "pilora": (
            {
                "partition": (method.get("partition") or {}).get("name"),
                "partition_args": (method.get("partition") or {}).get("args") or {},
                **groups["pilora"],
            }
            if method.get("name") == "pilora"
            else None
        ),
        "timing": groups["timing"],
        "wandb": {"id": item.get("id")},
    }


_HYDRA_KEYS = {
    "model",
    "task",
    "method",
    "trainer",
    "logger",
    "seed",
    "resume",
    "save_adapter",
    "sweep_name",
    "output_dir",
    "tuned",
}


def _hydra_config(cfg: dict) -> dict:
    """Runs logged before the W&B config was the Hydra config alone also carry Trainer's ~150
    TrainingArguments and PEFT keys at the top level (``learning_rate``, ``run_name``, ``peft_config``
    with each seed's ``rank_pattern``); they would put every seed in a configuration of its own."""
    if isinstance(cfg.get("method"), dict) and isinstance(cfg.get("task"), dict):
        return {k: v for k, v in cfg.items() if k in _HYDRA_KEYS}
    return cfg


def _with_artifacts(rec: dict, item: dict) -> dict:
    """The record with its stage-1 statistics pointing at the run's ``importance.pt`` artifact, so
    the figures are drawn from what W&B holds (the job's own path may not exist here)."""
    local = (item.get("artifact_files") or {}).get("importance.pt")
    if not local:
        return rec
    rec = json.loads(json.dumps(rec))
    for part in ("pilora", "budget_match"):
        if isinstance(rec.get(part), dict) and rec[part].get("importance_file"):
            rec[part]["importance_file"] = local
    return rec


def _items_frame(items: list[dict], where: str, dedupe: bool = True) -> pd.DataFrame:
    rows, skipped = [], []
    for item in items:
        label = f"wandb:{item.get('path') or item.get('id')}"
        try:
            rows.append(record_row(wandb_record(item), label, source="wandb"))
        except RecordError as err:
            skipped.append((label, str(err)))
        except Exception as err:
            skipped.append((label, f"unexpected content ({type(err).__name__}: {err})"))
    for label, why in skipped:
        say(f"warning: skipping {label}: {why}")
    df = frame(rows)
    if dedupe:
        df = drop_duplicates(df)
    df.attrs.update(roots=[f"wandb:{where}"], skipped=skipped, missing_roots=[])
    return df


def load_wandb_dir(root: str, dedupe: bool = True) -> pd.DataFrame:
    """Offline W&B run folders under ``root`` (searched recursively) as the same frame as
    :func:`load_records`; see :mod:`analysis.wandb_runs`. Raises :class:`WandbSourceError` when
    ``root`` holds no run."""
    from .wandb_runs import OfflineRunError, find_offline_runs, read_run, read_runs

    if not os.path.isdir(root):
        raise WandbSourceError(f"--wandb-dir {root}: no such folder")
    paths = find_offline_runs(root)
    if not paths:
        raise WandbSourceError(
            f"--wandb-dir {root}: no offline W&B runs (run-<id>.wandb files) below it; point "
            "it at the jobs' output folders (or their wandb/ subfolders) and check that they "
            "ran with logger=wandb"
        )
    items, broken = [], []

    def read(path):
        try:
            return read_run(path)
        except (OfflineRunError, OSError) as err:
            return err

    for path, item in zip(paths, read_runs(paths, read)):
        if isinstance(item, Exception):
            broken.append((path, str(item)))
            say(f"warning: skipping {path}: {item}")
        else:
            items.append(item)
    gone = [item for item in items if item.get("missing_files")]
    if gone:
        # an incomplete copy would give tables without a run, or figures without their heat maps
        raise WandbSourceError(
            "; ".join(
                f"run {item.get('name')} ({item['path']}) lost its artifact files "
                f"{', '.join(item['missing_files'])} (neither in W&B's staging folder "
                f"{', '.join(sorted({os.path.dirname(f) for f in item.get('missing_staged') or []})) or '?'} "
                "nor in the run's files/)"
                for item in gone
            )
            + "; copy these run folders again from the machine that ran them (their files/ holds the copies "
            "since this version), `wandb sync` them there, or read the local records with --root"
        )
    df = _items_frame(items, root, dedupe)
    df.attrs["skipped"] = broken + df.attrs["skipped"]
    return df


def parse_wandb_path(path: str) -> tuple[str | None, str]:
    """``ENTITY/PROJECT`` or ``PROJECT`` -> (entity, project)."""
    parts = path.strip("/").split("/")
    if len(parts) > 2 or not all(parts):
        raise WandbSourceError(f"--wandb {path!r}: expected ENTITY/PROJECT (e.g. my-team/pilora) or PROJECT")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def load_wandb(
    project: str,
    entity: str | None = None,
    cache_dir: str | None = None,
    filters: dict | None = None,
    refresh: bool = False,
    api=None,
    dedupe: bool = True,
) -> pd.DataFrame:
    """Runs of a W&B project as the same frame as :func:`load_records`.

    The runs' configs and summaries are pulled once into ``<cache_dir>/<entity>__<project>.json``
    (``cache_dir`` defaults to ``$PILORA_WANDB_CACHE`` or ``.wandb_cache``); later calls read the
    cache unless ``refresh=True``. When the API cannot be reached, a message says so and the cache
    (if any) is used. ``filters`` is a W&B (MongoDB-style) run filter, e.g.
    ``{"config.task.name": "cola"}``; ``api`` may be a ``wandb.Api``-like object (tests).
    """
    cache_dir = cache_dir or os.environ.get("PILORA_WANDB_CACHE", ".wandb_cache")
    path = _cache_file(cache_dir, project, entity, filters)
    where = f"{entity}/{project}" if entity else project
    payload = None
    if refresh or not os.path.exists(path):
        try:
            items = _pull(project, entity, filters, api, artifact_dir=path[: -len(".json")] + "_artifacts")
            payload = {
                "project": project,
                "entity": entity,
                "filters": filters,
                "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "runs": items,
            }
            atomic_write_json(path, payload, indent=1, fsync=False)
        except WandbSourceError:
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
            if os.path.exists(path):
                say(f"W&B API not reachable for {where} ({reason}); using the local cache {path}")
            else:
                say(
                    f"W&B API not reachable for {where} ({reason}) and there is no local cache at {path}; "
                    "no records (log in with `wandb login`, or set WANDB_MODE/WANDB_BASE_URL)"
                )
                df = frame([])
                df.attrs.update(roots=[f"wandb:{where}"], skipped=[], missing_roots=[], wandb_cache=None)
                return df
    if payload is None:
        with open(path) as f:
            payload = json.load(f)
    df = _items_frame(payload.get("runs", []), where, dedupe)
    df.attrs.update(wandb_cache=path, pulled_at=payload.get("pulled_at"))
    return df


# ----------------------------------------------------------------------------- CLI


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The record-source options shared by ``analysis.tables`` and ``analysis.figures``."""
    p.add_argument("--root", action="append", help="results tree (repeatable; default outputs/ and multirun/)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the records from this W&B project (public API)")
    p.add_argument("--wandb-dir", metavar="DIR", help="read the records from the offline W&B runs below DIR")
    p.add_argument("--wandb-project", help=argparse.SUPPRESS)  # older spelling of --wandb
    p.add_argument("--wandb-entity", help=argparse.SUPPRESS)
    p.add_argument("--wandb-cache", help="W&B cache folder (default $PILORA_WANDB_CACHE or .wandb_cache)")
    p.add_argument("--refresh", action="store_true", help="pull the W&B project again")
    p.add_argument("--revision", metavar="REV", help="use only the records of this git revision (hash or prefix)")


def load_source(args) -> pd.DataFrame:
    """Records from ``--wandb`` / ``--wandb-dir`` / ``--root`` (raises :class:`WandbSourceError`),
    of one ``--revision`` if given (else a warning when averaged records come from different code)."""
    if args.wandb_dir:
        df = load_wandb_dir(args.wandb_dir)
    elif args.wandb or args.wandb_project:
        entity, project = parse_wandb_path(args.wandb) if args.wandb else (args.wandb_entity, args.wandb_project)
        df = load_wandb(project, entity, args.wandb_cache, refresh=args.refresh)
    else:
        df = load_records(args.root)
    return check_revisions(df, getattr(args, "revision", None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="List run records (one row per job).")
    p.add_argument("--root", action="append", help="results tree (repeatable; default outputs/ and multirun/)")
    p.add_argument("--query", help="pandas query, e.g. \"method == 'pilora' and seed == 0\"")
    p.add_argument(
        "--columns",
        default="task,model,method,seed,r,supplementary_r,partition_label,"
        "dominant_fraction,adapter_share,config_key,path",
    )
    p.add_argument("--value", help="print only this column of the first matching record (for scripts)")
    p.add_argument("--which", default="best", choices=["best", "final"])
    args = p.parse_args(argv)
    df = load_records(args.root, quiet=bool(args.value))
    if not df.empty:
        df["score"] = score(df, args.which)
    if args.query and not df.empty:
        df = df.query(args.query)
    if args.value:
        if df.empty or args.value not in df.columns:
            say(f"no matching record with a {args.value!r} field")
            return 1
        print(df[args.value].iloc[0])
        return 0
    cols = [c for c in args.columns.split(",") if c in df.columns] + (["score"] if "score" in df.columns else [])
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
        print(df[cols].to_string(index=False) if not df.empty else "(no records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
