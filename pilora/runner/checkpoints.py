"""Checkpoints of a stage: which one to resume from, whether its files load, and training from it
with errors that say whether the checkpoint or the run is at fault."""

from __future__ import annotations

import json
import logging
import os

from ..distributed import is_main
from .callbacks import FirstStep
from .jobdir import holds_lock

log = logging.getLogger("pilora")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files are all present but one of them cannot be read."""


class ResumeError(RuntimeError):
    """A checkpoint that does not load into this run (damaged, tampered with, or another config)."""


def checkpoints(stage_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` folders of a stage, newest first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for name in os.listdir(stage_dir):
        head, _, step = name.rpartition("-")
        if head == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(stage_dir, name)):
            found.append((int(step), os.path.join(stage_dir, name)))
    return [p for _, p in sorted(found, reverse=True)]


def save_finished(ckpt: str, required: tuple[str, ...]) -> bool:
    """Trainer writes ``trainer_state.json`` last (then our callbacks add ``required``): a checkpoint
    without a readable one was cut short while being saved."""
    try:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return all(os.path.exists(os.path.join(ckpt, r)) for r in required)


# (what, file-name prefix): optimizer.pt (FSDP: optimizer.bin / optimizer_0/), scheduler.pt,
# rng_state.pth (DDP: rng_state_<rank>.pth)
STATE_FILES = (("optimizer state", "optimizer"), ("lr scheduler state", "scheduler"), ("RNG state", "rng_state"))


def verify_checkpoint(ckpt: str) -> None:
    """Open every weight / optimizer / RNG file of a checkpoint; raise :class:`CorruptCheckpoint`
    naming the first one that does not load (truncated, overwritten, zero bytes ...)."""
    import zipfile

    names = os.listdir(ckpt)
    # the Trainer writes these before trainer_state.json: a finished checkpoint without one lost it
    # since, and resuming would restart AdamW's moments, the lr schedule or the data order silently
    lost = [what for what, prefix in STATE_FILES if not any(n.startswith(prefix) for n in names)]
    if lost:
        raise CorruptCheckpoint(
            f"checkpoint {ckpt!r} has no {' and no '.join(lost)}, so it cannot resume this run as it was. "
            f"Delete {ckpt!r} to resume from the previous checkpoint (or the whole stage folder to restart "
            "the stage)."
        )
    for name in sorted(names):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)  # header offsets are checked against the file size
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(path) as z:  # torch.save's format; CRC-checks every record
                    bad = z.testzip()
                if bad is not None:
                    raise ValueError(f"record {bad!r} fails its CRC check")
            elif name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
        except Exception as err:  # noqa: BLE001 - any failure to read means the file is unusable
            raise CorruptCheckpoint(
                f"checkpoint {ckpt!r} is corrupted: {name} cannot be read ({type(err).__name__}: {err}). "
                f"Delete {ckpt!r} to resume from the previous checkpoint (or the whole stage folder to "
                "restart the stage)."
            ) from err
        if _is_weights(name):
            bad = _non_finite(path)
            if bad:
                key, count = bad
                raise CorruptCheckpoint(
                    f"checkpoint {ckpt!r} holds non-finite weights: {key!r} in {name} has {count} NaN/inf "
                    f"value(s), so resuming would train and report NaN. Delete {ckpt!r} to resume from the "
                    "previous checkpoint; if that one is also refused the run diverged earlier: rerun with "
                    "resume=false (e.g. a lower trainer.learning_rate)."
                )


def _is_weights(name: str) -> bool:
    """Model / adapter weight files of a checkpoint (not optimizer, scheduler or RNG state)."""
    return name.endswith(".safetensors") or (
        name.endswith(".bin") and name.startswith(("pytorch_model", "adapter_model"))
    )


def _non_finite(path: str) -> tuple[str, int] | None:
    """The first floating tensor of a weight file holding NaN/inf, and how many such values (one
    tensor in memory at a time)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return key, int((~torch.isfinite(t)).sum())
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key, t in state.items() if isinstance(state, dict) else ():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key, int((~torch.isfinite(t)).sum())
    return None


def resume_point(stage_dir: str, enabled: bool, required: tuple[str, ...] = ()) -> str | None:
    """The newest checkpoint of ``stage_dir`` to resume from, or None to start the stage.

    A newest checkpoint whose save was cut short (the job was killed while saving) is removed and
    the one before it is used; a checkpoint whose save finished but whose files do not load
    raises :class:`CorruptCheckpoint` naming the file.
    """
    import shutil

    if not enabled or not os.path.isdir(stage_dir):
        return None
    # only the holder of the job's lock may remove a checkpoint: without it, the "cut short"
    # checkpoint may be one a live run is writing right now
    owner = is_main() and holds_lock(stage_dir)
    from .cost import COST_IN_CHECKPOINT

    for ckpt in checkpoints(stage_dir):
        if not save_finished(ckpt, (*required, COST_IN_CHECKPOINT)):
            log.warning(
                "checkpoint %s was cut short while being saved; %s", ckpt, "removing it" if owner else "ignoring it"
            )
            if owner:
                shutil.rmtree(ckpt, ignore_errors=True)
            continue
        verify_checkpoint(ckpt)
        return ckpt
    return None


def training_finished(ckpt: str) -> bool:
    """Whether ``ckpt`` was saved after the last training step (the job was killed later, during
    the final evaluation or saves)."""
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    return int(state.get("max_steps") or 0) > 0 and int(state.get("global_step", 0)) >= int(state["max_steps"])


def load_finished(trainer, ckpt: str) -> None:
    """Put ``trainer`` where ``trainer.train`` would have left it after the last step of ``ckpt``:
    its weights (the best ones under ``load_best_model_at_end``) and its state and log history.
    Calling ``train`` instead would run one more optimizer step."""
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(os.path.join(ckpt, "trainer_state.json"))
    trainer._load_from_checkpoint(ckpt)
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and os.path.isdir(best):
        trainer._load_best_model()
    # With step checkpoints and epoch evaluation, the last checkpoint is written before the
    # end-of-epoch evaluation of an uninterrupted run; that evaluation is run here instead.
    step = trainer.state.global_step
    evaluated = any(e.get("step") == step and any(k.startswith("eval_") for k in e) for e in trainer.state.log_history)
    if (
        str(getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)) == "epoch"
        and not evaluated
        and trainer.eval_dataset is not None
    ):
        trainer.evaluate()


def fit(trainer, resume: str | None, clock=None) -> None:
    """``trainer.train``, resuming from ``resume``; a failure while that checkpoint loads is named as such.

    With a :class:`pilora.runner.cost.JobClock`, its state is saved in every checkpoint and restored from
    ``resume``. A ``resume`` checkpoint saved after the last step is only loaded, not trained on."""
    if clock is not None:
        from .cost import CostCallback

        if resume:
            clock.restore_from_checkpoint(resume)
        trainer.add_callback(CostCallback(clock))
    if resume and training_finished(resume):
        log.info("checkpoint %s was saved after the last training step: loading it, no further training", resume)
        try:
            load_finished(trainer, resume)
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            raise ResumeError(
                f"could not load the finished checkpoint {resume!r} ({type(err).__name__}: {err}); "
                "it is damaged or does not fit this run: delete it to retrain its last steps"
            ) from err
        return
    marker = FirstStep()
    trainer.add_callback(marker)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        if resume and not marker.started:  # errors once training runs are the run's own, not the checkpoint's
            raise ResumeError(
                f"could not resume from checkpoint {resume!r} ({type(err).__name__}: {err}); "
                "it does not fit this run (changed config?) or is damaged: delete it to resume "
                "from the previous one"
            ) from err
        raise
    finally:
        trainer.remove_callback(marker)


def non_finite_weights_failure(model) -> str | None:
    """Why a record must not be marked complete: the parameters of ``model`` that hold NaN/inf."""
    import torch

    bad = [
        name
        for name, p in model.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())
    ]
    if not bad:
        return None
    return (
        f"{len(bad)} parameter tensor(s) of the trained model hold NaN/inf values (first: {bad[0]}), so its "
        "metrics are meaningless; the record is marked failed. Rerun with resume=false (e.g. with a lower "
        "trainer.learning_rate)"
    )
