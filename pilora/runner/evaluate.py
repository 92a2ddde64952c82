"""The final evaluation on its own: which settings are evaluation-only, the files a job reads
(checked before any training), and the trained model reloaded from a job folder.

A job writes its adapter (``adapter/``, or ``model/`` for full fine-tuning) and the record of its
training (``training.json``: the record without the test metrics) before the final evaluation
starts. A job killed or failed during evaluation, or rerun with changed evaluation-only settings
(:attr:`pilora.tasks.base.Task.evaluation_keys`, e.g. ``task.eval_only=[boolq]``), reloads the
adapter and reruns only the evaluation; the job manifest leaves those keys out, so they never make
the folder stale. The record's ``evaluation.settings`` says which settings produced its test metrics.
"""

from __future__ import annotations

import copy
import logging
import os

log = logging.getLogger("pilora")
TRAINING_RECORD = "training.json"
PREDICTIONS_DIR = "predictions"


def _task_class(cfg: dict):
    from ..tasks import FAMILIES

    return FAMILIES.get((cfg.get("task") or {}).get("family"))


def evaluation_keys(cfg: dict) -> tuple[str, ...]:
    cls = _task_class(cfg)
    return tuple(cls.evaluation_keys) if cls is not None else ()


def without_evaluation(cfg: dict) -> dict:
    """``cfg`` without the task's evaluation-only keys: what decides the trained weights."""
    keys = evaluation_keys(cfg)
    if not keys or not isinstance(cfg.get("task"), dict):
        return cfg
    return {**cfg, "task": {k: v for k, v in cfg["task"].items() if k not in keys}}


def is_evaluation_key(cfg: dict, dotted: str) -> bool:
    """Whether the dotted config key (``task.eval_sets.boolq``) lies under an evaluation-only key."""
    parts = dotted.replace("[", ".").split(".")
    return len(parts) > 1 and parts[0] == "task" and parts[1] in evaluation_keys(cfg)


def evaluation_settings(cfg: dict, out: str) -> dict:
    """The evaluation-only settings of ``cfg`` and the content identity of the files they name."""
    from .jobdir import _normalise, input_files

    task = cfg.get("task") or {}
    settings = {k: task.get(k) for k in evaluation_keys(cfg)}
    return _normalise({"task": settings, "inputs": input_files({"task": settings}, out)})


def check_inputs(cfg: dict, task, method) -> None:
    """Every file the job will read exists, before any training: a missing one stops the job in
    seconds with its config key, its path and the fix (not after hours of stage 2)."""
    from ..tasks.base import DataError, check_model_path

    files = dict(task.input_paths())
    if method.importance_from:
        files["method.importance_from"] = method.importance_from
    missing = {k: p for k, p in files.items() if p and not os.path.exists(os.path.expanduser(str(p)))}
    if missing:
        shown = "; ".join(f"{k}={p!r}" for k, p in missing.items())
        raise DataError(
            f"input file(s) of this job not found: {shown}. Fix these keys (or task.dataset.root), "
            "or leave a test set out with task.eval_only=[<names>]; nothing was trained"
        )
    from ..tasks.gguf import resolve

    model = resolve(cfg["model"])  # model.gguf: the GGUF package installed, the folder converted
    if not model.get("from_config") and not (model.get("openclip") or {}).get("model_cfg"):
        check_model_path(model)
        if model.get("tokenizer"):
            check_model_path(model, "tokenizer")


def load_trained(cfg: dict, task, out: str, adapter: str | None = None):
    """The trained model of job folder ``out``: the pretrained model + the stock-PEFT ``adapter/``
    (or ``adapter``), or the fine-tuned ``model/`` of ``method=full``."""
    from peft import PeftModel

    full = os.path.join(out, "model")
    if adapter is None and os.path.isdir(full) and not os.path.isdir(os.path.join(out, "adapter")):
        saved = copy.copy(task.model_cfg)
        task.model_cfg = {**saved, "path": full, "from_config": None}
        try:
            return task.build_model()
        finally:
            task.model_cfg = saved
    folder = adapter or os.path.join(out, "adapter")
    base = task.build_model()
    try:
        return PeftModel.from_pretrained(base, folder)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"the adapter {folder} does not fit model {cfg['model'].get('name')!r}: {err}. "
            "Evaluate it on the model it was trained on (model=...)"
        ) from err


def saved_weights(out: str) -> bool:
    return os.path.isdir(os.path.join(out, "adapter")) or os.path.isdir(os.path.join(out, "model"))
