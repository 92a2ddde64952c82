"""The shared trainer: one job = one method on one task, recorded in ``results.json``.

``train(cfg)`` takes the composed config (a plain dict or an OmegaConf node; Hydra is not
needed) and runs, all with ``transformers.Trainer``:

* single-stage methods (LoRA, rsLoRA, DoRA, PiSSA, MiLoRA): train, evaluate every epoch;
* LoRA-Dash: one run; :class:`~pilora.methods.lora_dash.DashLaunchCallback` picks the directions after
  ``method.prelaunch_steps`` steps (``dash_directions.pt``); full fine-tuning (``method=full``):
  every weight trains, the model is saved to ``model/``;
* PiLoRA: stage 1 (plain LoRA + :class:`ImportanceCallback`, 1 epoch or ``N`` steps) ->
  ``importance.pt`` -> partition -> stage 2 from the pretrained weights (Alg. 1 line 15).

Every stage checkpoints into its own folder and resumes from its last checkpoint, so rerunning
an interrupted command continues it. The record is written once, atomically, at the end.

Under ``torchrun`` / ``accelerate launch`` (DDP) every rank runs this same function; the ranks
check that stage 1 gave them identical partitions, and only rank 0 writes ``importance.pt``,
the adapter and ``results.json``. FSDP is refused for stage 1 (see :func:`pilora.distributed.refuse_sharded_stage1`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from typing import Any

import torch

from ..callbacks import STATS_IN_CHECKPOINT, ImportanceCallback
from ..distributed import (  # noqa: F401
    DistributedMismatch,
    check_ranks_agree,
    gather_full_model,
    is_main,
    is_sharded,
    refuse_sharded_stage1,
    refuse_unsharded_fsdp,
    world_size,
)
from ..importance import ImportanceAccumulator, ImportanceStats
from ..methods import METHODS, JobContext, MethodConfig, prepare_model, recorded_section
from ..methods.full import check_full_finetune_fsdp
from ..params import count_parameters
from ..tasks import make_task
from . import evaluate as evaluation
from . import wandb as wandb_run
from .checkpoints import CorruptCheckpoint, fit, non_finite_weights_failure, resume_point, verify_checkpoint  # noqa: F401
from .checks import check_values
from .console import per_rank_log_file
from .cost import JobClock
from .jobdir import JobLocked, StaleJob, Twin, open_job, take_clean  # noqa: F401 (re-exported)
from .records import RECORD, SCHEMA, atomic_write_json, best_and_final, git_revision, read_record
from .stats_check import check_statistics
from .trainer_args import make_trainer, training_args
from .validate import validate

log = logging.getLogger("pilora")
IMPORTANCE_FILE = "importance.pt"
TWIN_POLL_S = float(os.environ.get("PILORA_TWIN_POLL_S", "10"))  # how often a waiting sweep point looks again
MIN_CHECKS = 10  # fewer importance checks than this make hit counts coarse (T = 4 gives H/T in fifths)


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but the library needs no Hydra
        pass
    return dict(cfg)


def method_config(cfg: dict) -> MethodConfig:
    """``cfg.method`` + the model's target modules -> :class:`MethodConfig` (strict: an unknown
    key raises, listing the valid ones). ``target_modules: null`` means the model's own targets."""
    m = dict(cfg["method"])
    if m.get("target_modules") is None:
        m["target_modules"] = cfg["model"]["target_modules"]
    return MethodConfig.from_dict(m)


def _method_settings(cfg: dict) -> tuple[MethodConfig, dict, dict]:
    """The typed method config; ``cfg`` with the ``method`` section a record (and the job's identity)
    holds, the keys the method uses (:func:`pilora.methods.recorded_section`); and the keys it does
    not use that were set, which change nothing (``-m method=lora,pilora method.supplementary_r=1,2``
    is one LoRA job) and go into the record's ``ignored``."""
    check_values(cfg)  # a non-integer rank is named before anything converts it
    method = method_config(cfg)
    ignored = {f"method.{k}": v for k, v in method.ignored().items()}
    if ignored:
        log.warning("%s does not use %s: ignored", method.row_name, ", ".join(sorted(ignored)))
    return method, {**cfg, "method": recorded_section(cfg["method"])}, ignored


def run_stage1(
    cfg: dict, task, method: MethodConfig, data: dict, out: str, clock: JobClock | None = None
) -> tuple[ImportanceStats, str]:
    """Stage 1 of Alg. 1; returns the statistics and the file they were saved to. ``clock`` gets
    the stage's time as ``stages["stage1"]`` (restored from ``importance.pt`` / a checkpoint)."""
    clock = clock or JobClock()
    clock.start("stage1")
    path = os.path.join(out, IMPORTANCE_FILE)
    source = method.importance_from
    if source:
        log.info("PiLoRA stage 1: reusing importance statistics from %s", source)
        stats = ImportanceStats.load(source)
        clock.stop("stage1")
        return stats, os.path.abspath(source)
    # an interrupted job that had finished stage 1; never under resume=false, on any rank: rank 0
    # moves the earlier run away (take_clean) while the other ranks may already be here
    if cfg.get("resume", True) and os.path.exists(path):
        log.info("PiLoRA stage 1: already done, loading %s", path)
        try:
            stats = ImportanceStats.load(path)
        except ValueError as err:  # the job's own file: set it aside and run stage 1 again
            _set_aside(path, err)
        else:
            clock.restore(stats.meta.get("cost"))
            return stats, path
    stage_dir = os.path.join(out, "stage1")
    args = training_args(cfg, task, stage_dir, **stage1_overrides(method))
    refuse_sharded_stage1(args)
    torch.manual_seed(int(cfg["seed"]))
    model = prepare_model(task.build_model(), method, stage=1, task_type=task.task_type)
    resume = resume_point(stage_dir, cfg.get("resume", True), required=(STATS_IN_CHECKPOINT,))
    stats = ImportanceCallback.stats_from_checkpoint(resume) if resume else None
    acc = ImportanceAccumulator(
        model,
        interval=method.importance_interval,
        chunk_rows=method.chunk_rows,
        snapshot_interval=method.snapshot_interval,
        snapshot_shape=tuple(method.snapshot_size),
        snapshot_window=method.snapshot_window,
        stats=stats,
    )
    acc.stats.meta.update(  # a resumed stage 1 keeps what its checkpoint's meta holds (skipped_checks)
        {
            "task": task.name,
            "model": cfg["model"]["name"],
            "seed": cfg["seed"],
            "target_modules": method.target_modules,
            "r": METHODS[method.name].rank(method, None, 1),
            "alpha": METHODS[method.name].alpha(method, None, 1),
            "interval": method.importance_interval,
        }
    )
    log.info(
        "PiLoRA stage 1: importance accumulation (K=%d)%s",
        method.importance_interval,
        f", resuming {resume}" if resume else "",
    )
    trainer = make_trainer(cfg, task, model, data, args, [ImportanceCallback(acc)], evaluate=False)
    if method.importance_checks:
        acc.interval = acc.stats.meta["interval"] = interval_for_checks(trainer, int(method.importance_checks))
        log.info("PiLoRA stage 1: K=%d for %d checks", acc.interval, method.importance_checks)
    _warn_if_in_warmup(trainer)
    fit(trainer, resume, clock)
    stats = acc.finalize()
    _warn_if_few_checks(stats)
    stats.meta["steps"] = trainer.state.global_step
    stats.meta["world_size"] = world_size()
    clock.stop("stage1")
    stats.meta["cost"] = clock.state()  # a job resumed after stage 1 still counts its time
    if is_main():
        stats.save(path)
    # stage 2 builds a second model: free this one first. accelerate's mixed-precision forward
    # wrapper refers to the model from the model, so only the cycle collector frees it
    del trainer, model, acc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stats, path


def stage1_overrides(method: MethodConfig) -> dict:
    """What stage 1 changes in the trainer settings: its own length, and no evaluation."""
    return {
        "num_train_epochs": float(method.stage1.epochs),
        "max_steps": int(method.stage1.max_steps),
        "eval_strategy": "no",
        "load_best_model_at_end": False,
    }


def _set_aside(path: str, err: Exception) -> None:
    """Move a damaged ``importance.pt`` of this job to ``importance.pt.corrupt`` (kept for inspection)."""
    if is_main():
        os.replace(path, path + ".corrupt")
    log.warning(
        "PiLoRA stage 1: %s does not load (%s); moved it to %s and running stage 1 again", path, err, path + ".corrupt"
    )


def stage1_steps(trainer) -> int:
    """Optimizer steps the Trainer will run: ``max_steps``, else epochs × updates per epoch."""
    import math

    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    return max(1, math.ceil(args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)))


def interval_for_checks(trainer, checks: int) -> int:
    """``K`` such that about ``checks`` importance checks fall into stage 1: checks run at optimizer
    steps 0, K, 2K, ..., so ``T = ceil(steps / K)``, and ``K = steps // checks`` gives ``T ≥ checks``."""
    steps = stage1_steps(trainer)
    if checks > steps:
        log.warning(
            "method.importance_checks=%d exceeds stage 1's %d optimizer steps; checking every step (T = %d)",
            checks,
            steps,
            steps,
        )
    return max(1, steps // checks)


def _warn_if_in_warmup(trainer) -> None:
    """On small tasks stage 1 is shorter than the LR warm-up (RTE: 39 steps per epoch at batch 64,
    warm-up 100), so the importance statistics come from gradients at a fraction of the peak LR."""
    steps, warmup = stage1_steps(trainer), trainer.args.get_warmup_steps(stage1_steps(trainer))
    if warmup >= steps:
        log.warning(
            "PiLoRA stage 1 (%d optimizer steps) lies entirely inside the LR warm-up (%d steps): "
            "the importance statistics come from a rising learning rate",
            steps,
            warmup,
        )


def _warn_if_few_checks(stats: ImportanceStats) -> None:
    few = {k: s.checks for k, s in stats.modules.items() if s.checks < MIN_CHECKS}
    if few:
        t = min(few.values())
        log.warning(
            "the partition rests on T = %d importance check(s) (fewer than %d) in %d module(s): hit "
            "counts are coarse. Set method.importance_checks=%d (or a smaller method.importance_interval)",
            t,
            MIN_CHECKS,
            len(few),
            MIN_CHECKS,
        )


def _selection(trainer) -> dict:
    """Which model the reported metrics come from, and the validation value a sweeper may tune on."""
    args, state = trainer.args, trainer.state
    if args.load_best_model_at_end:
        return {
            "rule": "best_checkpoint",
            "metric": args.metric_for_best_model,
            "split": "validation",
            "greater_is_better": args.greater_is_better,
            "checkpoint": state.best_model_checkpoint,
            "value": state.best_metric,
        }
    return {"rule": "last", "metric": None, "split": None, "checkpoint": None, "value": None}


def objective(record: dict) -> float:
    """The validation value of the reported model, for Hydra sweepers (never a test metric):
    the selected checkpoint's value, else the last evaluation's ``eval_<metric>``; NaN for a
    duplicate sweep point (its twin reports the value)."""
    if record.get("status") == "duplicate":
        return float("nan")
    sel = (record.get("evaluation") or {}).get("selection") or {}
    if sel.get("value") is not None and str(sel.get("metric", "")).removeprefix("eval_") == record["metric"]:
        return float(sel["value"])
    final = record["metrics"]["final"] or {}
    return float(final.get(f"eval_{record['metric']}", float("nan")))


def _epoch_history(log_history: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in e.items() if k.startswith("eval_") or k in ("epoch", "step")}
        for e in log_history
        if "eval_loss" in e or any(k.startswith("eval_") for k in e)
    ]


def train(cfg: Any, sweep: bool = False, on_open=None) -> dict:
    """Run one job (see module docstring) and return its record.

    The job folder is locked for the whole job (a second copy stops with ``JobLocked``), and an
    earlier run in it is reused only if it was made with this same config (``StaleJob`` otherwise);
    see :mod:`pilora.runner.jobdir`. In a sweep (``sweep=True``, as ``run.py -m`` passes) a point that
    repeats one running in parallel (same config, one folder) does not stop: it returns a record
    with ``status: "duplicate"`` naming the folder whose record is its result. ``on_open(folder)``
    runs once the folder is this job's (locked and reusable), e.g. to save the Hydra config there."""
    cfg = _plain(cfg)
    if cfg.get("smoke"):  # a dry run at toy length in a throwaway folder (pilora.runner.smoke)
        from . import smoke

        return smoke.run(cfg, train)
    method, cfg, ignored = _method_settings(cfg)  # the one typed method object from here on
    validate(cfg, method)  # every stage's settings, before the folder is made or anything trains
    job = open_job(cfg, twins=sweep)
    if isinstance(job, Twin) and (cfg["task"].get(evaluation.SELECT_KEY) is not None):
        # a point of `-m task.eval_only=[boolq],[piqa]` run in parallel with the one that trains:
        # its sets still need scoring, after that training (which it then reuses)
        log.info("%s is held by %s (this job's training): waiting to score its test sets", job.folder, job.holder)
        while isinstance(job, Twin):
            time.sleep(TWIN_POLL_S)
            job = open_job(cfg, twins=sweep)
    if isinstance(job, Twin):
        log.warning(
            "%s is being written by %s, a job of this same config (a sweep point repeated, e.g. by a key "
            "its method does not use); its record there is this job's result",
            job.folder,
            job.holder,
        )
        return {"status": "duplicate", "output_dir": job.folder, "holder": job.holder}
    try:
        if on_open is not None and is_main():
            on_open(os.path.abspath(cfg["output_dir"]))
        return _train(cfg, method, ignored)
    finally:
        job.release()


def _train(cfg: dict, method: MethodConfig, ignored: dict) -> dict:
    from transformers import set_seed

    out = os.path.abspath(cfg["output_dir"])
    os.makedirs(out, exist_ok=True)
    per_rank_log_file(out)
    done = read_record(os.path.join(out, RECORD))
    todo = None
    if done and done.get("status") == "complete" and cfg.get("resume", True):
        todo = evaluation.plan(done, cfg, out)
        if todo is None:
            log.info("job already complete: %s", os.path.join(out, RECORD))
            return done
        log.info(
            "%s holds no scores of %s under these evaluation settings: evaluating %s",
            os.path.join(out, RECORD),
            "these test sets" if todo.sets else "this job",
            ", ".join(todo.sets) if todo.sets else "again",
        )
    set_seed(int(cfg["seed"]))
    task = make_task(cfg["task"], cfg["model"], int(cfg["seed"]))
    evaluation.check_inputs(cfg, task, method)  # a missing file stops the job before any training
    data = task.datasets()
    if not cfg.get("resume", True) and is_main():  # the inputs loaded: now the earlier run may go
        take_clean(cfg, out)
    run = wandb_run.start_run(cfg, out) if is_main() else None
    try:
        record = _run(cfg, task, method, data, out, todo)
        record["ignored"] = ignored
        if run is not None:
            record["wandb"] = wandb_run.record_entry(run)
        if is_main():
            atomic_write_json(os.path.join(out, RECORD), record)
            log.info("record written: %s", os.path.join(out, RECORD))
        if run is not None:  # summary = the record; artifacts = record, stage-1 statistics, adapter
            wandb_run.finish_run(
                run,
                record,
                cfg,
                out,
                {
                    "results": os.path.join(out, RECORD),
                    "adapter": os.path.join(out, "adapter"),
                    "predictions": os.path.join(out, evaluation.PREDICTIONS_DIR),
                    "importance": (record.get("pilora") or record.get("budget_match") or {}).get("importance_file"),
                },
            )
            run = None
        return record
    finally:
        if run is not None:
            wandb_run.abort(run)  # a failed job: its run ends marked as failed


def _run(cfg, task, method, data, out, todo=None) -> dict:
    training = read_record(os.path.join(out, evaluation.TRAINING_RECORD)) if cfg.get("resume", True) else None
    if training and training.get("status") == "complete" and evaluation.saved_weights(out):  # never a failed one
        return _evaluate_only(cfg, task, method, data, out, training, todo)
    timings = {}
    clock = JobClock()  # time and peak memory summed over the segments of a preempted job
    plugin = METHODS[method.name]  # the method answers what this job does (pilora.methods.base.Method)

    def stage1(config: MethodConfig):  # PiLoRA's stage 1, for the method that needs it
        stats_and_path = run_stage1(cfg, task, config, data, out, clock)
        timings["stage1_s"] = clock.stages["stage1"]
        return stats_and_path

    job = JobContext(out=out, task=task, trainer=cfg["trainer"], main=is_main(), stage1=stage1)
    # the job's own config (its head modules, a budget match's ranks): a copy, the typed config stays
    plan = plugin.before_training(plugin.job_config(method, task), job)
    mc = plan.config
    # The head of stage 2 is initialised exactly like a single-stage run's: same seed, fresh model
    torch.manual_seed(int(cfg["seed"]))
    base = task.build_model()
    if plan.stats is not None:
        check_statistics(plan.stats, plan.stats_path, base, mc, cfg["model"]["name"])
    model = plugin.build(base, mc, masks=plan.masks, task_type=task.task_type)
    plugin.on_built(model, plan, job)  # PiSSA / MiLoRA: the initial adapter, to save a loadable one
    params = count_parameters(model)
    stage_dir = os.path.join(out, plan.stage)
    args = training_args(cfg, task, stage_dir)
    log.info(
        "%s: training %s (%d trainable parameters, %.2f%%)",
        plan.title or mc.name,
        task.name,
        params.trainable,
        100 * params.share,
    )
    callbacks = plugin.callbacks(model, plan, job)  # e.g. LoRA-Dash's launch
    plugin.check_training(args, model)  # what the method cannot train with (LoRA-Dash: FSDP)
    check_full_finetune_fsdp(args, model)  # FSDP settings transformers would ignore (any method)
    trainer = make_trainer(cfg, task, model, data, args, callbacks)
    refuse_unsharded_fsdp(args, trainer.accelerator.distributed_type)
    resume = resume_point(stage_dir, cfg.get("resume", True))
    if resume:
        log.info("resuming from %s", resume)
    clock.start(plan.stage)
    fit(trainer, resume, clock)
    timings[f"{plan.stage}_s"] = clock.stop(plan.stage)
    epochs = _epoch_history(trainer.state.log_history)
    sharded = is_sharded(model)  # FSDP: evaluate, export and check an all-gathered copy (every rank)
    model = gather_full_model(
        model, lambda: plugin.build(task.build_model(), mc, masks=plan.masks, task_type=task.task_type)
    )
    final, best = best_and_final(epochs, task.metric, task.cfg.get("metric_mode", "max"))
    # the adapter and the record of training first: a failure or kill during the final evaluation
    # then costs only the evaluation (the rerun reloads adapter/ and evaluates, pilora.runner.evaluate)
    saved = cfg.get("save_adapter", True)
    if saved:  # adapter/ (stock PEFT / lm-eval; PiLoRA also adapter_pilora/), or model/ for full fine-tuning
        plugin.save(trainer, model, out, main=is_main(), sharded=sharded)
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    failure = non_finite_weights_failure(model)  # NaN/inf weights make NaN metrics: never a "complete" record
    if failure:
        log.error("%s", failure)
    timings["train_total_s"] = clock.elapsed()
    training = {
        "schema": SCHEMA,
        "status": "failed" if failure else "complete",
        "failure": failure,
        "task": task.name,
        "family": task.family,
        "method": method.row_name,
        "model": cfg["model"]["name"],
        "seed": int(cfg["seed"]),
        "metric": task.metric,
        "config": cfg,
        "git": git_revision(),
        "epochs": epochs,
        "train_loss": train_losses,
        "metrics": {"final": final, "best": best, "test": None},
        "evaluation": {"selection": _selection(trainer)},
        "params": params.to_dict(),
        # each method's record section ("pilora", "budget_match", "lora_dash"): None unless it is this job's
        **plugin.record(plan),
        "timing": timings,
        "steps": trainer.state.global_step,
        "peak_memory_mb": clock.peak(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": world_size(),
    }
    if saved and is_main():
        atomic_write_json(os.path.join(out, evaluation.TRAINING_RECORD), training)
        log.info("adapter and training record written; final evaluation next")
    return _final_evaluation(cfg, task, model, trainer, data, training, out)


def _final_evaluation(cfg, task, model, trainer, data, training: dict, out: str, todo=None, weights=None) -> dict:
    """The record: ``training`` (the record of training) + the test metrics of ``model``, with the
    evaluation settings that produced them (``evaluation.settings``; per test set ``evaluation.sets``).
    ``todo`` (:func:`pilora.runner.evaluate.plan`) scores only the sets a finished record lacks, and
    keeps the others' scores. Named test sets are saved as each finishes
    (:class:`pilora.runner.evaluate.SetProgress`; ``weights``: the folder of the weights scored,
    by default ``out``'s ``adapter/`` or ``model/``), so a rerun after a kill scores only the rest."""
    record = json.loads(json.dumps(training, default=str))
    scorer, wanted = task, evaluation.selected_sets(cfg)
    if todo is not None and todo.sets is not None:  # the missing sets only, on a task object of their own
        scorer = make_task({**cfg["task"], evaluation.SELECT_KEY: list(todo.sets)}, cfg["model"], int(cfg["seed"]))
    scorer.predictions_dir = os.path.join(out, evaluation.PREDICTIONS_DIR) if is_main() else None
    progress = None
    if wanted is not None:
        weights = weights or evaluation.weights_folder(out)
        progress = scorer.set_progress = evaluation.SetProgress(cfg, out, weights, write=is_main())
    t0 = time.time()
    test = scorer.final_metrics(model, trainer, data)
    record["config"] = cfg  # evaluation-only keys as this evaluation ran them
    record["evaluation"] = {
        **task.protocol(),
        "selection": (training.get("evaluation") or {}).get("selection"),
        "settings": evaluation.evaluation_settings(cfg, out),
    }
    if wanted is not None:
        scored = list(wanted)
        if todo is not None and todo.sets is not None:
            order = list((cfg["task"].get(evaluation.SETS_KEY) or {}))
            test = evaluation.merge_set_metrics(todo.old["metrics"]["test"], test, todo.keep, order)
            scored = [n for n in order if n in set(todo.keep) | set(todo.sets)]
        record["evaluation"]["sets"] = evaluation.all_set_settings(cfg, scored, out)
        mismatched = task.size_mismatches(test) if hasattr(task, "size_mismatches") else {}
        if mismatched:  # sets scored in full whose size is not the reference's (llm_adapters.EVAL_SETS)
            record["evaluation"]["size_mismatch"] = mismatched
    record["metrics"]["test"] = test
    predictions = os.path.join(out, evaluation.PREDICTIONS_DIR)
    if os.path.isdir(predictions):
        names = None if wanted is None else {f"{n}.jsonl" for n in record["evaluation"]["sets"]}
        record["predictions"] = sorted(
            os.path.join(predictions, f)
            for f in os.listdir(predictions)
            if f.endswith(".jsonl") and (names is None or f in names)
        )
    timings = record["timing"]
    timings["final_eval_s"] = time.time() - t0
    timings["total_s"] = timings.pop("train_total_s", 0.0) + timings["final_eval_s"]
    if progress is not None:  # the record about to be written holds them now
        progress.clear()
    return record


def _evaluate_only(cfg, task, method, data, out, training: dict, todo=None) -> dict:
    """Rerun only the final evaluation of a trained job: its saved adapter (or model/) on a fresh
    pretrained model, scored like an uninterrupted run's in-memory model."""
    log.info("training already done (%s): reloading the trained weights and rerunning only the evaluation", out)
    torch.manual_seed(int(cfg["seed"]))
    model = evaluation.load_trained(cfg, task, out)
    stage_dir = os.path.join(out, "stage2" if training.get("pilora") else "train")
    args = training_args(cfg, task, stage_dir)
    trainer = make_trainer(cfg, task, model, data, args)
    return _final_evaluation(cfg, task, model, trainer, data, training, out, todo)
