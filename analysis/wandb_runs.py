"""Offline W&B run folders -> the run items :func:`analysis.wandb_source.load_wandb` builds records from.

A job logged with ``WANDB_MODE=offline`` leaves ``<output_dir>/wandb/offline-run-<time>-<id>/``
holding ``run-<id>.wandb``, W&B's transaction log. It is read with W&B's own reader,
``wandb leet inspect --json`` (wandb >= 0.31: one JSON object per record: run, config, summary,
history, artifact, exit ...), which also reads the log of a job killed mid-write up to its torn
tail; nothing here decodes the file format itself.

:func:`read_run` returns, per run, what :func:`analysis.wandb_source._pull` returns for a run of
the public API: id, name, state, config, summary, the job's ``results.json`` and the local paths
of its artifact files (``importance.pt`` for the figures). Artifact files of an offline run stay
in W&B's staging folder (``$WANDB_DATA_DIR``), outside the run folder; the job also copies
``results.json`` and ``importance.pt`` into the run's ``files/`` (:mod:`pilora.runner.wandb`), and
those copies stand in for staged files that are not there (a run folder copied to another machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

_CACHE: dict[tuple, list[dict]] = {}  # (path, size, mtime) -> records: each log is read once per process


class OfflineRunError(ValueError):
    """An offline W&B folder that cannot be read (the message says why and what to do)."""


def _wandb_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "wandb")
    return [exe] if os.path.isfile(exe) else [shutil.which("wandb") or "wandb"]


def read_records(path: str) -> list[dict]:
    """The records of one ``run-<id>.wandb`` file, as ``wandb leet inspect --json`` prints them
    (``{"num": 2, "type": "run", "run": {...}}``). A job killed while writing leaves a torn tail:
    the records before it are returned (W&B's reader stops there)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    try:
        proc = subprocess.run(
            [*_wandb_cli(), "leet", "inspect", "--json", path], capture_output=True, text=True, env=env, timeout=300
        )
    except FileNotFoundError as err:
        raise OfflineRunError(f"cannot read {path}: the `wandb` command is not installed ({err})") from err
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "No such command" in proc.stderr:
            raise OfflineRunError(
                f"cannot read {path}: this wandb has no `wandb leet inspect` ({why}); install wandb>=0.31"
            )
        raise OfflineRunError(f"{path} is not a readable W&B transaction log (wandb leet inspect: {why})")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    _CACHE[key] = records
    return records


def find_offline_runs(root: str) -> list[str]:
    """Every ``run-*.wandb`` file under ``root`` (searched recursively), sorted."""
    found = []
    for here, dirs, files in os.walk(root):
        # latest-run is W&B's link to the newest run folder: a copied tree holds it as a second copy
        dirs[:] = sorted(
            d for d in dirs if not d.startswith("checkpoint-") and d not in ("adapter", "adapter_pilora", "latest-run")
        )
        found += [os.path.join(here, f) for f in files if f.startswith("run-") and f.endswith(".wandb")]
    return sorted(found)


def _update(target: dict, update: dict | None) -> None:
    for k, v in (update or {}).items():
        if not k.startswith("_"):  # W&B's own keys (_wandb, _runtime, _step, _timestamp)
            target[k] = v


def read_run(path: str) -> dict:
    """One offline run file -> a run item (see module docstring)."""
    run_info, config, summary, artifacts, exit_code = {}, {}, {}, {}, None
    for rec in read_records(path):
        kind = rec.get("type")
        body = rec.get(kind) or {}
        if kind == "run":
            run_info = {
                "id": body.get("run_id"),
                "name": body.get("display_name"),
                "project": body.get("project"),
                "entity": body.get("entity"),
                "group": body.get("run_group"),
                "job_type": body.get("job_type"),
                "tags": list(body.get("tags") or []),
                "commit": (body.get("git") or {}).get("commit") or None,
                "created_at": body.get("start_time"),  # a rerun's run folder is the newer one
            }
            _update(config, (body.get("config") or {}).get("update"))
            _update(summary, (body.get("summary") or {}).get("update"))
        elif kind == "config":
            _update(config, body.get("update"))
        elif kind == "summary":
            _update(summary, body.get("update"))
        elif kind == "artifact":
            meta = body.get("metadata")
            artifacts[body.get("type")] = {
                "name": body.get("name"),
                "metadata": json.loads(meta) if isinstance(meta, str) and meta else meta or {},
                "files": {e["path"]: e.get("local_path") for e in (body.get("manifest") or {}).get("contents") or []},
            }
        elif kind == "exit":
            exit_code = int(body.get("exit_code") or 0)
    if not run_info:
        raise OfflineRunError(f"{path} holds no run record (a job killed before W&B started); delete its folder")
    state = "running" if exit_code is None else "finished" if exit_code == 0 else "failed"
    folder = os.path.dirname(path)
    files, missing = {}, []  # the files of the results artifact: what the analysis reads
    for name, local in (artifacts.get("results") or {}).get("files", {}).items():
        copy = os.path.join(folder, "files", name)
        if local and os.path.isfile(local):
            files[name] = local
        elif os.path.isfile(copy):  # the run folder's own copy (a folder copied from elsewhere)
            files[name] = copy
        else:
            missing.append((name, local))
    if "results.json" not in files and os.path.isfile(os.path.join(folder, "files", "results.json")):
        files["results.json"] = os.path.join(folder, "files", "results.json")  # runs logged without artifacts
    record = None
    if "results.json" in files:
        with open(files["results.json"]) as f:
            record = json.load(f)
    return {
        **run_info,
        "state": state,
        "path": folder,
        "config": config,
        "summary": summary,
        "record": record,
        "artifact_files": files,
        "artifact_types": sorted(artifacts),
        "artifacts": artifacts,
        "missing_files": sorted({name for name, _ in missing}),  # artifact paths (importance.pt)
        "missing_staged": sorted({local for _, local in missing if local}),  # where W&B had staged them
    }


def read_runs(paths: list[str], read=read_run, workers: int = 4) -> list:
    """``read`` (:func:`read_run`) of each path, in order, a few at a time (each W&B reader is a process)."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return list(pool.map(read, paths))
