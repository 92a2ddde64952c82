"""The final evaluation on its own: which settings are evaluation-only, the files a job reads
(checked before any training), and the trained model reloaded from a job folder.

A job writes its adapter (``adapter/``, or ``model/`` for full fine-tuning) and the record of its
training (``training.json``: the record without the test metrics) before the final evaluation
starts. A job killed or failed during evaluation, or rerun with changed evaluation-only settings
(:attr:`pilora.tasks.base.Task.evaluation_keys`, e.g. ``task.eval_only=[boolq]``), reloads the
adapter and reruns only the evaluation; the job manifest leaves those keys out, so they never make
the folder stale. The record's ``evaluation.settings`` says which settings produced its test metrics.

An evaluation of named test sets saves each set as it finishes (``predictions/<set>.json``: its
metrics, its settings, the trained weights' and its predictions file's identity; see
:class:`SetProgress`), so a rerun after a kill scores only the sets left, and its record equals an
uninterrupted run's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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


# -- test sets scored by separate jobs into one record -------------------------------------------
# A task whose evaluation keys include ``eval_sets`` ({name: file}) scores each named set on its own
# (``eval_only`` selects them). A record then lists under ``evaluation.sets`` the settings of every
# set it holds, each as if that set alone had been asked for; a later job of the same training
# (``-m task.eval_only=[boolq],[piqa]`` shares one folder) scores only the sets the record lacks
# under the current settings, and adds them.
SETS_KEY, SELECT_KEY = "eval_sets", "eval_only"


def selected_sets(cfg: dict) -> dict[str, str] | None:
    """``{name: file}`` of the test sets ``cfg`` asks for, or None when its task has no named sets."""
    if SETS_KEY not in evaluation_keys(cfg):
        return None
    from ..tasks.generation import select_test_sets

    task = cfg.get("task") or {}
    return select_test_sets(task.get(SETS_KEY), task.get(SELECT_KEY), task.get("name"))


def set_settings(cfg: dict, name: str, out: str) -> dict | None:
    """The evaluation settings of test set ``name`` alone (its file's identity included); None when
    ``cfg`` names no file for it."""
    path = ((cfg.get("task") or {}).get(SETS_KEY) or {}).get(name)
    if not path:
        return None
    alone = {**cfg, "task": {**cfg["task"], SETS_KEY: {name: path}, SELECT_KEY: [name]}}
    return evaluation_settings(alone, out)


def all_set_settings(cfg: dict, names, out: str) -> dict[str, dict]:
    return {n: set_settings(cfg, n, out) for n in names}


@dataclasses.dataclass
class Plan:
    """What a rerun of a finished job still has to score: ``sets`` (None: everything ``cfg`` asks
    for), and ``keep``, the sets of the old record that stay as they are (same settings, same file)."""

    sets: list[str] | None = None
    keep: list[str] = dataclasses.field(default_factory=list)
    old: dict | None = None


def plan(done: dict, cfg: dict, out: str) -> Plan | None:
    """None when the finished record ``done`` already holds what ``cfg`` asks to score; else what
    remains (:class:`Plan`)."""
    recorded = (done.get("evaluation") or {}).get("settings")
    if recorded is None or recorded == evaluation_settings(cfg, out):
        return None
    wanted, have = selected_sets(cfg), (done.get("evaluation") or {}).get("sets")
    if wanted is None or have is None:  # no named sets (or a record from before evaluation.sets)
        return Plan()
    current = all_set_settings(cfg, set(wanted) | set(have), out)
    missing = [n for n in wanted if have.get(n) != current[n]]
    if not missing:
        return None
    keep = [n for n in have if n not in missing and current.get(n) is not None and have[n] == current[n]]
    return Plan(sets=missing, keep=keep, old=done)


def merge_set_metrics(old: dict, new: dict, keep: list[str], order: list[str]) -> dict:
    """The test metrics of the kept sets of ``old`` (``test_<set>_*``) plus ``new``, set by set in
    ``order`` (the task's ``eval_sets``); ``test_avg_accuracy`` is the mean over every set the result
    holds, summed in that order: the numbers of one job that scored all of them."""
    old = {k: v for k, v in (old or {}).items() if any(k.startswith(f"test_{n}_") for n in keep)}
    pool = {**old, **{k: v for k, v in new.items() if k != "test_avg_accuracy"}}
    merged = {}
    for name in order:
        merged.update({k: v for k, v in pool.items() if k.startswith(f"test_{name}_")})
    accs = [merged[f"test_{n}_accuracy"] for n in order if f"test_{n}_accuracy" in merged]
    if accs:
        merged["test_avg_accuracy"] = sum(accs) / len(accs)
    merged.update({k: v for k, v in pool.items() if k not in merged})  # lm_eval_*: this job's
    return merged


def weights_folder(folder: str) -> str | None:
    """The trained weights of job folder ``folder`` that :func:`load_trained` reloads: ``adapter/``,
    else ``model/`` (full fine-tuning); None when neither was saved (``save_adapter=false``)."""
    for name in ("adapter", "model"):
        if os.path.isdir(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _weights_identity(folder: str | None) -> list | None:
    """Name, size and mtime of every file of the weights folder: a retrained (or replaced) adapter
    changes it, so a set scored on other weights is not reused."""
    if not folder or not os.path.isdir(folder):
        return None
    found = []
    for here, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            st = os.stat(os.path.join(here, name))
            found.append([os.path.relpath(os.path.join(here, name), folder), st.st_size, st.st_mtime_ns])
    return found


def _sha256(path: str) -> str | None:
    """The file's digest (the job inputs' hashing and cache, :func:`pilora.runner.jobdir.file_digest`);
    None for a file that is not there."""
    from .jobdir import file_digest

    try:
        return file_digest(path)
    except OSError:
        return None


class SetProgress:
    """The test sets an evaluation into ``out`` has finished, one file each:
    ``predictions/<set>.json`` beside ``predictions/<set>.jsonl``, holding the set's metrics, its
    evaluation settings (:func:`set_settings`: the set's file digest included), the identity of
    the weights scored (``weights``, a folder) and the digest of its predictions file. A rerun reuses
    a set only when all of them are unchanged, so a kill while the third of eight sets is scored
    costs the third set, not the first two. :meth:`clear` removes the files once the evaluation is
    over (its record then holds the metrics): a later evaluation of the same settings, e.g. the
    smoke run's reload, really scores again. Only ``write=True`` (the main rank) writes; every rank
    reads, so all ranks skip the same sets. Without saved weights nothing is saved: a rerun trains
    again, and the sets are scored on its weights."""

    def __init__(self, cfg: dict, out: str, weights: str | None, write: bool = True):
        self.cfg, self.out, self.write = cfg, out, write
        self.dir = os.path.join(out, PREDICTIONS_DIR)
        self.weights = _weights_identity(weights)
        self.saved: list[str] = []

    def _path(self, name: str, ext: str) -> str:
        return os.path.join(self.dir, f"{name}.{ext}")

    def _identity(self, name: str) -> dict:
        return json.loads(json.dumps({"settings": set_settings(self.cfg, name, self.out), "weights": self.weights}))

    def finished(self, name: str) -> dict | None:
        """The metrics of set ``name`` as an earlier evaluation of these settings saved them, or None."""
        if self.weights is None:
            return None
        try:
            with open(self._path(name, "json")) as f:
                saved = json.load(f)
            metrics, identity, digest = saved["metrics"], saved["identity"], saved["predictions_sha256"]
        except (OSError, ValueError, KeyError, TypeError):  # none, or a damaged one: score the set
            return None
        if identity != self._identity(name) or digest != _sha256(self._path(name, "jsonl")):
            return None
        self.saved.append(name)
        return metrics

    def save(self, name: str, metrics: dict) -> None:
        """Set ``name`` is scored (its ``.jsonl`` written): record it, atomically."""
        if not self.write or self.weights is None:
            return
        from ..io import atomic_write_json

        entry = {
            "metrics": metrics,
            "identity": self._identity(name),
            "predictions_sha256": _sha256(self._path(name, "jsonl")),
        }
        atomic_write_json(self._path(name, "json"), entry)
        self.saved.append(name)

    def clear(self) -> None:
        if self.write:
            for name in self.saved:
                if os.path.exists(self._path(name, "json")):
                    os.remove(self._path(name, "json"))


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
        return load_finetuned(task, full)
    folder = adapter or os.path.join(out, "adapter")
    base = task.build_model()
    try:
        return PeftModel.from_pretrained(base, folder)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"the adapter {folder} does not fit model {cfg['model'].get('name')!r}: {err}. "
            "Evaluate it on the model it was trained on (model=...)"
        ) from err


def load_finetuned(task, folder: str):
    """``method=full``'s ``model/``. A transformers model saved its config there and reloads from
    it; a model that is not one (the CLIP image classifier, the open_clip tower) has only its
    weights, which Trainer writes as a state dict: build the task's model, then load them strictly,
    so a missing or extra tensor is an error rather than a pretrained weight scored as trained."""
    if os.path.exists(os.path.join(folder, "config.json")):
        saved = copy.copy(task.model_cfg)
        task.model_cfg = {**saved, "path": folder, "from_config": None}
        try:
            return task.build_model()
        finally:
            task.model_cfg = saved
    single = os.path.join(folder, "model.safetensors")  # what Trainer._save writes for such a model
    if not os.path.exists(single):
        raise FileNotFoundError(
            f"{folder} holds neither config.json nor model.safetensors: not a saved model of "
            f"method=full; it has {sorted(os.listdir(folder))}"
        )
    from safetensors.torch import load_file

    model = task.build_model()
    model.load_state_dict(load_file(single), strict=True)
    return model


def saved_weights(out: str) -> bool:
    return os.path.isdir(os.path.join(out, "adapter")) or os.path.isdir(os.path.join(out, "model"))


# -- python -m pilora.runner.evaluate ----------------------------------------------------------
EVAL_DIR = "eval"
# the scoring Trainer never trains, evaluates per epoch or saves (it only predicts test splits)
_NO_TRAINING = {
    "eval_strategy": "no",
    "load_best_model_at_end": False,
    "save_strategy": "no",
}  # <run>/eval/<settings>/: one folder per evaluation (a sweep job per test set)


def _apply(cfg: dict, overrides: list[str], only_evaluation: bool) -> dict:
    from omegaconf import OmegaConf

    node = OmegaConf.create(cfg)
    for item in overrides:
        key, eq, _ = item.partition("=")
        key = key.lstrip("+")
        if not eq:  # OmegaConf's dotlist would read a bare key as key=null
            raise ValueError(f"{item!r} is not a key=value override: write e.g. {key}=<value>")
        if only_evaluation and not is_evaluation_key(cfg, key + ".x"):
            keys = evaluation_keys(cfg)
            raise ValueError(
                f"{key} is not an evaluation setting of task {cfg['task']['name']!r}: a trained run is scored "
                "with its own training config; "
                + (
                    f"evaluation settings are task.{{{', '.join(keys)}}}"
                    if keys
                    else "this task has no evaluation-only settings: drop the overrides"
                )
            )
    node.merge_with(OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    return OmegaConf.to_container(node, resolve=True)


def _compose(overrides: list[str]) -> dict:
    """A config composed like ``run.py`` would (run from the repository root, where conf/ lies)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import hydra_setup  # noqa: F401 (the method schema and the resolvers of conf/)

    with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg.output_dir = ""
    return OmegaConf.to_container(cfg, resolve=True)


def evaluate(target: str, overrides: list[str] = (), adapter: bool = False, out: str | None = None) -> dict:
    """Score a finished run folder ``target`` (its training config, with evaluation-only
    ``overrides``) or, with ``adapter=True``, a stock PEFT adapter folder on the model and task that
    ``overrides`` compose. Writes ``results.json`` and ``predictions/<set>.jsonl`` into ``out``
    (default ``<target>/eval/<overrides>``) and returns the record."""
    from ..io import atomic_write_json
    from ..tasks import make_task
    from .config import safe_dirname
    from .jobdir import JobLock, StaleJob
    from .records import RECORD, read_record
    from .train import _plain
    from .trainer_args import make_trainer, training_args

    target = os.path.abspath(target)
    if adapter and not os.path.exists(os.path.join(target, "adapter_config.json")):
        job = read_record(os.path.join(target, TRAINING_RECORD)) is not None
        raise FileNotFoundError(
            f"{target} holds no adapter_config.json, so it is not a PEFT adapter folder: "
            + (
                f"it is a job folder; drop --adapter to score it with its own config (or pass {target}/adapter)"
                if job
                else "pass the folder a PEFT save_pretrained wrote"
            )
        )
    if adapter:
        cfg = _compose(list(overrides))
        training = {"status": "complete", "failure": None, "adapter": target, "metrics": {}, "timing": {}}
        training["evaluation"] = {"selection": None}
    else:
        training = read_record(os.path.join(target, TRAINING_RECORD))
        if training is None or not saved_weights(target):
            raise FileNotFoundError(
                f"{target} holds no finished training ({TRAINING_RECORD} and adapter/ or model/); "
                "pass a job folder whose training finished, or --adapter <PEFT folder> with model=... task=..."
            )
        cfg = _apply(_plain(training["config"]), list(overrides), only_evaluation=True)
    out = os.path.abspath(out or os.path.join(target, EVAL_DIR, safe_dirname(",".join(overrides) or "default")))
    cfg["output_dir"] = out
    settings = evaluation_settings(cfg, out)
    with JobLock(out):
        done = read_record(os.path.join(out, RECORD))
        if done is not None:
            if (done.get("evaluation") or {}).get("settings") != settings or done.get("source") != target:
                raise StaleJob(
                    f"{out} holds an evaluation of other settings or another run; pass another --out, or delete it"
                )
            return done
        from .validate import check_task

        # the training path's checks (commonsense: every chosen test file exists and is a complete
        # JSON list, with the LLM-Adapters download hint), before the model loads
        check_task(cfg)
        task = make_task(cfg["task"], cfg["model"], int(cfg.get("seed", 0)))
        data = task.evaluation_datasets()  # bad data fails before the model loads
        import torch

        # as training seeded before building its model (random base weights of from_config models,
        # a head's initial values that the saved adapter then overwrites)
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = load_trained(cfg, task, target, adapter=target if adapter else None)
        trainer = make_trainer(
            cfg,
            task,
            model,
            data,
            training_args(cfg, task, os.path.join(out, "trainer"), **_NO_TRAINING),
            evaluate=False,
        )
        from .train import _final_evaluation

        weights = target if adapter else weights_folder(target)
        record = _final_evaluation(cfg, task, model, trainer, data, {"config": cfg, **training}, out, weights=weights)
        record["source"] = target  # what makes it a re-scoring (records.is_rescoring)
        atomic_write_json(os.path.join(out, RECORD), record)
        log.info("evaluation written: %s", os.path.join(out, RECORD))
        return record


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m pilora.runner.evaluate",
        description="Score a finished run folder (or a stock PEFT adapter) on its task's test sets.",
    )
    p.add_argument(
        "target", help="a job folder (its training config is used) or, with --adapter, a PEFT adapter folder"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value: evaluation settings, e.g. task.eval_only=[boolq]; "
        "with --adapter also model=... task=... task.dataset.root=...",
    )
    p.add_argument("--adapter", action="store_true", help="target is a stock PEFT adapter folder")
    p.add_argument("--out", help="where results.json and predictions/ go (default <target>/eval/<overrides>)")
    args = p.parse_intermixed_args(argv)  # `TARGET --adapter model=...` as the README writes it
    try:
        rec = evaluate(args.target, args.overrides, adapter=args.adapter, out=args.out)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        print(f"error: {err}")
        return 1
    for k, v in sorted((rec["metrics"].get("test") or {}).items()):
        print(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}")
    print(f"record: {os.path.join(rec['config']['output_dir'], 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
