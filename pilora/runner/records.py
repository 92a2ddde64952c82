"""Run records: one ``results.json`` per job, written atomically."""

from __future__ import annotations

import json
import math
import os
import subprocess

from ..io import RecordWriteError, atomic_write, atomic_write_json, umask_mode  # noqa: F401 (re-exported)

SCHEMA = 1
RECORD = "results.json"


# folders inside a job directory that never hold records (walking checkpoints would be slow)
_PRUNE = {".hydra", "wandb", "adapter", "adapter_pilora", "adapter_lora_dash", "adapter_init", "model"}


def find_records(roots: list[str]) -> list[str]:
    """Every ``results.json`` under the folders ``roots`` (a ``results.json`` path counts as itself),
    sorted; checkpoints and adapter folders are not entered."""
    found = []
    for root in roots:
        if os.path.isfile(root) and os.path.basename(root) == RECORD:
            found.append(os.path.abspath(root))
            continue
        for here, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _PRUNE and not d.startswith("checkpoint-"))
            if RECORD in files:
                found.append(os.path.abspath(os.path.join(here, RECORD)))
    return sorted(set(found))


def is_rescoring(record) -> bool:
    """A record ``python -m pilora.runner.evaluate`` wrote (its ``source`` is the run it scored
    again, often on some test sets only): not a job of its own, so tables and summaries skip it."""
    return isinstance(record, dict) and bool(record.get("source"))


def read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def git_revision(cwd: str | None = None) -> dict:
    here = cwd or os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return {"revision": rev or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def best_and_final(epochs: list[dict], metric: str, mode: str = "max") -> tuple[dict, dict]:
    """Final = the last evaluation; best = the evaluation with the best ``metric`` (``mode``)."""
    if not epochs:
        return {}, {}
    final = epochs[-1]
    key = f"eval_{metric}"
    scored = [e for e in epochs if isinstance(e.get(key), (int, float)) and not math.isnan(e[key])]
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda e: e[key]) if scored else final
    return final, best
