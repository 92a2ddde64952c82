"""``smoke=true`` (or ``debug=default``): a dry run of a job, like Lightning's ``fast_dev_run``.

It runs the whole job at toy length in a throwaway folder: every input file and the tokenizer
are checked, each stage takes :data:`STEPS` optimizer steps, each test set :data:`BATCHES`
batches, the adapter is saved, reloaded and scored again (the path a rerun after a failure during
evaluation takes), and the record is written. Then it prints what the full run would cost:
optimizer steps per stage, importance checks, test examples, and a time estimate from the
measured seconds per step. Nothing is written into the job's own folder, and the throwaway folder
is removed when the run passes (``smoke=keep`` keeps it, to look at what the job wrote).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile

log = logging.getLogger("pilora")
STEPS = 2  # optimizer steps per stage
BATCHES = 2  # batches per test set


def smoke_config(cfg: dict) -> dict:
    """The toy-length copy of ``cfg``: a throwaway folder, 2 steps a stage, 2 batches a test set."""
    small = copy.deepcopy(cfg)
    small.pop("smoke", None)
    small["output_dir"] = tempfile.mkdtemp(prefix="pilora-smoke-")
    small["resume"] = True
    small["logger"] = {"name": "none"}  # a dry run never makes a W&B run
    small["trainer"] = {**small["trainer"], "max_steps": STEPS, "eval_strategy": "no", "load_best_model_at_end": False}
    small["trainer"]["save_strategy"] = "no"
    method = dict(small["method"])
    method["stage1"] = {**(method.get("stage1") or {}), "max_steps": STEPS}
    method["importance_interval"], method["importance_checks"] = 1, None
    small["method"] = method
    task = dict(small["task"])
    if "eval_limit" in task:  # generation tasks: 2 batches of each test set
        task["eval_limit"] = BATCHES * int(task.get("eval_batch_size") or 1)
    else:  # classification / vision: 2 batches of the labelled test split (Task.final_metrics)
        task["test_limit"] = BATCHES * int(small["trainer"].get("per_device_eval_batch_size") or 8)
    small["task"] = task
    return small


def _updates(n_examples: int, trainer: dict, epochs: float) -> int:
    per_step = int(trainer.get("per_device_train_batch_size") or 8) * int(
        trainer.get("gradient_accumulation_steps") or 1
    )
    return max(1, math.ceil(float(epochs) * math.ceil(n_examples / per_step)))


def full_cost(cfg: dict, n_train: int, test_sizes: dict, record: dict) -> dict:
    """Optimizer steps, importance checks and test examples of the full run ``cfg``, and a time
    estimate from the smoke run's seconds per optimizer step."""
    from ..methods import METHODS

    trainer, method = cfg["trainer"], cfg["method"]
    steps = {}
    if METHODS[method["name"]].runs_stage1(method):
        s1 = (method.get("stage1") or {}).get("max_steps") or -1
        steps["stage1"] = (
            int(s1) if int(s1) > 0 else _updates(n_train, trainer, (method.get("stage1") or {}).get("epochs", 1))
        )
    ms = int(trainer.get("max_steps") or -1)
    steps["stage2" if "stage1" in steps else "train"] = (
        ms if ms > 0 else _updates(n_train, trainer, trainer.get("num_train_epochs", 3))
    )
    cost = {"optimizer_steps": steps, "test_examples": test_sizes}
    if "stage1" in steps:
        checks = method.get("importance_checks")
        k = max(1, steps["stage1"] // int(checks)) if checks else int(method.get("importance_interval") or 1)
        cost["importance_checks"] = math.ceil(steps["stage1"] / k)
    timing = record.get("timing") or {}
    trained = sum(v for key, v in timing.items() if key in ("stage1_s", "stage2_s", "train_s"))
    per_step = trained / (STEPS * len(steps)) if trained else None
    if per_step:
        cost["estimated_train_hours"] = round(per_step * sum(steps.values()) / 3600, 3)
    return cost


def report(cost: dict, folder: str, kept: bool) -> str:
    where = f"kept in {folder}" if kept else f"throwaway folder {folder} removed; smoke=keep keeps it"
    lines = [f"smoke run passed ({where}); the full run would take:"]
    lines += [f"  {stage}: {n} optimizer steps" for stage, n in cost["optimizer_steps"].items()]
    if "importance_checks" in cost:
        lines.append(f"  importance checks (T): {cost['importance_checks']}")
    for name, n in cost["test_examples"].items():
        lines.append(f"  test set {name}: {n} examples")
    if "estimated_train_hours" in cost:
        lines.append(f"  training time at this run's speed: about {cost['estimated_train_hours']} h")
    return "\n".join(lines)


def run(cfg: dict, train) -> dict:
    """The smoke run of ``cfg`` with :func:`pilora.runner.train.train`; its record gets ``smoke``
    (the full run's cost) and ``reloaded_test`` (the metrics of the reloaded adapter)."""
    from ..tasks import make_task
    from .records import RECORD

    small = smoke_config(cfg)
    folder = small["output_dir"]
    record = train(small)
    # the reload: score the saved adapter like a rerun after a failure during evaluation does
    os.remove(os.path.join(folder, RECORD))
    again = train(small)
    if again["metrics"]["test"] != record["metrics"]["test"]:
        log.warning(
            "smoke run: the reloaded adapter scores %s, the trained model %s",
            again["metrics"]["test"],
            record["metrics"]["test"],
        )
    task = make_task(cfg["task"], cfg["model"], int(cfg["seed"]))
    data = task.datasets()
    n_train = len(data["train"])
    sizes = {}
    if hasattr(task, "test_sets"):
        from ..tasks import llm_adapters as cs

        sizes = {n: len(cs.load_commonsense_split(p)) for n, p in task.test_sets().items()}
        if cfg["task"].get("eval_limit"):
            sizes = {n: min(v, int(cfg["task"]["eval_limit"])) for n, v in sizes.items()}
    elif data.get("test") is not None:
        sizes = {"test": len(data["test"])}
    cost = full_cost(cfg, n_train, sizes, record)
    kept = str(cfg.get("smoke")).lower() == "keep"
    if not kept:  # a 7B job's dry run leaves adapters, checkpoints and statistics behind otherwise
        shutil.rmtree(folder, ignore_errors=True)
    print(report(cost, folder, kept))  # once: run.log belongs to the removed folder
    return {
        **again,
        "smoke": {"folder": folder, "kept": kept, "full_run": cost, "trained_test": record["metrics"]["test"]},
    }
