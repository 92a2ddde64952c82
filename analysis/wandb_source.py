"""Records from W&B: a project through the public API (pulled once into a local JSON cache that
is used when the API cannot be reached), or offline run folders (read by :mod:`analysis.wandb_runs`),
as the same frame as :func:`analysis.records.load_records`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time

import pandas as pd

from pilora.runner.records import RECORD, SCHEMA, atomic_write_json

from .dedupe import drop_duplicates
from .rows import RecordError, frame, record_row, say


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
            "created_at": getattr(run, "created_at", None),
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


def _timestamp(text) -> float | None:
    """W&B's ISO start time (``2026-12-06T20:40:30.911994Z``) in seconds: of two runs of one
    configuration and seed, the newer one is kept, as the newer ``results.json`` is locally."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _items_frame(items: list[dict], where: str, dedupe: bool = True) -> pd.DataFrame:
    rows, skipped = [], []
    for item in items:
        label = f"wandb:{item.get('path') or item.get('id')}"
        try:
            rows.append(record_row(wandb_record(item), label, source="wandb", mtime=_timestamp(item.get("created_at"))))
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
            else:  # nothing to show: tables of the paper's numbers alone would look like an empty project
                raise WandbSourceError(
                    f"W&B API not reachable for {where} ({reason}) and there is no local cache at {path}; "
                    "log in with `wandb login` (or set WANDB_BASE_URL), pull once where the API is reachable "
                    "and copy the cache folder here (--wandb-cache), or read offline run folders with --wandb-dir"
                ) from err
    if payload is None:
        with open(path) as f:
            payload = json.load(f)
    df = _items_frame(payload.get("runs", []), where, dedupe)
    df.attrs.update(wandb_cache=path, pulled_at=payload.get("pulled_at"))
    return df
