"""Offline W&B run folders -> the run items :func:`analysis.records.load_wandb` builds records from.

A job logged with ``WANDB_MODE=offline`` leaves ``<output_dir>/wandb/offline-run-<time>-<id>/``
holding ``run-<id>.wandb``: W&B's transaction log, a sequence of ``wandb_internal_pb2.Record``
protobuf messages (run, config, summary, history, artifact, exit ...). The installed wandb has
no Python reader for it (``wandb sync`` reads it in its Go core), so :func:`read_records` undoes
only the framing (LevelDB's log format: 32 KiB blocks of CRC-checked chunks, after a 7-byte
``:W&B`` header) and lets wandb's own protobuf classes decode every record.

:func:`read_run` returns, per run, what :func:`analysis.records._pull` returns for a run of
the public API: id, name, state, config, summary, the job's ``results.json`` (from the run's
``results`` artifact, else the copy in the run's ``files/``) and the local paths of its artifact
files (``importance.pt`` for the figures).
"""

from __future__ import annotations

import json
import os
import struct
import zlib

HEADER = b":W&B"
_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """An offline W&B folder that cannot be read (the message says why and what to do)."""


def read_records(path: str):
    """Yield the decoded ``wandb_internal_pb2.Record`` messages of one ``run-<id>.wandb`` file.

    A chunk whose checksum fails ends the file: a job killed while writing leaves a torn tail,
    and everything before it is still a valid run."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != HEADER:
        raise OfflineRunError(f"{path} is not a W&B transaction log (no {HEADER!r} header)")
    pos, parts = _CHUNK_HEADER, []
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if len(chunk) != length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return
        if kind == _FULL:
            parts = [chunk]
        elif kind == _FIRST:
            parts = [chunk]
            continue
        elif kind == _MIDDLE:
            parts.append(chunk)
            continue
        elif kind == _LAST:
            parts.append(chunk)
        else:
            return
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        yield record


def _set(tree: dict, keys, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _apply(target: dict, items) -> None:
    for it in items:
        keys = list(it.nested_key) or [it.key]
        _set(target, keys, json.loads(it.value_json))


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


def read_run(path: str) -> dict:
    """One offline run file -> a run item (see module docstring)."""
    run_info, config, summary, artifacts, exit_code = {}, {}, {}, {}, None
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run_info = {
                "id": r.run_id,
                "name": r.display_name,
                "project": r.project,
                "entity": r.entity,
                "group": r.run_group,
                "job_type": r.job_type,
                "tags": list(r.tags),
                "commit": r.git.commit or None,
            }
            _apply(config, r.config.update)
            _apply(summary, r.summary.update)
        elif kind == "config":
            _apply(config, rec.config.update)
        elif kind == "summary":
            _apply(summary, rec.summary.update)
        elif kind == "artifact":
            a = rec.artifact
            artifacts[a.type] = {e.path: e.local_path for e in a.manifest.contents}
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    if not run_info:
        raise OfflineRunError(f"{path} holds no run record (a job killed before W&B started); delete its folder")
    config.pop("_wandb", None)
    state = "running" if exit_code is None else "finished" if exit_code == 0 else "failed"
    files = {os.path.basename(p): lp for kind in artifacts.values() for p, lp in kind.items()}
    record, missing = None, []
    record_file = files.get("results.json")
    if record_file and not os.path.isfile(record_file):
        missing.append(record_file)
        record_file = None
    if record_file is None:  # the copy the run keeps in its own folder
        copy = os.path.join(os.path.dirname(path), "files", "results.json")
        record_file = copy if os.path.isfile(copy) else None
    if record_file:
        with open(record_file) as f:
            record = json.load(f)
    for name, local in list(files.items()):
        if local and not os.path.exists(local):
            missing.append(local)
            files.pop(name)
    return {
        **run_info,
        "state": state,
        "path": os.path.dirname(path),
        "config": config,
        "summary": summary,
        "record": record,
        "artifact_files": files,
        "artifact_types": sorted(artifacts),
        "missing_files": sorted(set(missing)),
    }
