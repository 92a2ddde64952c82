"""The ``TrainingArguments`` and ``Trainer`` of every stage, built from the ``trainer:`` config.

Each ``trainer.<key>`` is a ``TrainingArguments`` field, checked here (name, scalar type) so that a
typo or a YAML string stops the job naming the key; the few fields the runner sets itself are
refused. :func:`make_trainer` adds the runner's callbacks and console to ``PiLoRATrainer``."""

from __future__ import annotations

import typing

import torch

from ..distributed import world_size
from ..hints import did_you_mean
from . import wandb as wandb_run
from .callbacks import NanLossGuard
from .console import MetricsToLog, StageProgress, stage_label

# TrainingArguments we set ourselves; a user value for them would be silently ignored
_OWNED = {"output_dir", "report_to", "remove_unused_columns", "logging_nan_inf_filter", "seed"}


def _scalar_type(hint):
    """``float`` / ``int`` / ``bool`` when a TrainingArguments field is one of them (or Optional of
    one); None for anything richer (enums, str unions, dicts), which TrainingArguments checks itself."""
    if hint in (float, int, bool):
        return hint, False
    args = typing.get_args(hint)
    if len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if inner in (float, int, bool):
            return inner, True
    return None, False


def check_trainer_keys(trainer_cfg: dict) -> dict:
    """Every ``trainer.<key>`` must be a TrainingArguments field of the right scalar type.

    Strings that parse as the expected number are converted (YAML reads ``1e-4`` as a string);
    anything else raises a ValueError naming the key, the value and the expected type.
    """

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    out = {}
    for key, value in trainer_cfg.items():
        if key not in hints:
            raise ValueError(
                f"trainer.{key} is not a transformers.TrainingArguments field"
                + did_you_mean(key, hints, prefix="trainer.", n=3)
                + "; every key under trainer: is passed to TrainingArguments"
            )
        kind, optional = _scalar_type(hints[key])
        if kind is None or (value is None and optional):
            out[key] = value
            continue
        bad = ValueError(
            f"trainer.{key} must be {'an' if kind is int else 'a'} {kind.__name__}"
            f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})"
        )
        if kind is bool:
            if not isinstance(value, bool):
                raise bad
            out[key] = value
            continue
        number = as_number(value)
        if number is None or (kind is int and not number.is_integer()):
            raise bad
        out[key] = number if kind is float else int(number)
    return out


def as_number(value) -> float | None:
    """``value`` as a float when it is a number or a string that parses as one (YAML 1.1 reads
    ``1e-4`` as a string); None for anything else: a bool (``true`` is no number), null, a list,
    text, NaN."""
    import math

    if isinstance(value, (bool, list, dict)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def training_args(cfg: dict, task, output_dir: str, **overrides):
    from transformers import TrainingArguments

    clash = _OWNED & set(cfg["trainer"])
    if clash:
        raise ValueError(
            f"trainer.{sorted(clash)[0]} is set by the runner; use "
            "output_dir / logger / seed at the top level of the config instead"
        )
    kwargs = {"dataloader_pin_memory": torch.cuda.is_available(), **check_trainer_keys(cfg["trainer"]), **overrides}
    launched = world_size()
    if launched > 1 and not torch.cuda.is_available():
        # accelerate only sets up CPU DDP (gloo) when told use_cpu; otherwise every rank would
        # silently train on the whole data set on its own
        kwargs.setdefault("use_cpu", True)
    # never Trainer's own W&B callback: pilora.runner.wandb logs each stage under its own prefix
    # and keeps the run's config to the resolved Hydra config
    report = "none"
    try:
        args = TrainingArguments(
            output_dir=output_dir,
            report_to=report,
            seed=int(cfg["seed"]),
            remove_unused_columns=task.remove_unused_columns,
            logging_nan_inf_filter=False,
            **kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid trainer settings ({err}); fix the trainer.* keys named above") from err
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but the Trainer runs {args.world_size} "
            f"process(es) in parallel mode {args.parallel_mode.value!r}: the ranks would train "
            "independently. Check the launcher (torchrun / accelerate launch) and trainer.use_cpu."
        )
    return args


def check_trainable_dtypes(args, model) -> None:
    """fp16 mixed precision (``trainer.fp16``) scales the loss and unscales fp32 gradients, so a
    float16 trainable weight stops the first optimizer step (GradScaler: "Attempting to unscale FP16
    gradients"). On a float16 base PEFT keeps the adapters fp32, but a task head (modules_to_save)
    and a full fine-tune's weights stay float16."""
    if not getattr(args, "fp16", False):
        return
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        from .validate import ConfigError

        raise ConfigError(
            f"trainer.fp16=true (fp16 mixed precision) needs fp32 trainable weights, and {len(half)} trainable "
            f"tensor(s) are float16 (e.g. {half[0]}: a task head or a full fine-tune's weights load in "
            "model.dtype=float16). Set model.dtype=float32 (or model.dtype=bfloat16 with trainer.bf16=true "
            "trainer.fp16=false)"
        )


def make_trainer(cfg, task, model, data, args, callbacks=(), evaluate=True):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..trainer import PiLoRATrainer

    check_trainable_dtypes(args, model)  # before the Trainer: the first step would fail

    trainer = PiLoRATrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if evaluate else None,
        data_collator=task.collator(),
        compute_metrics=task.compute_metrics,  # also what predict() reports on a test split
        callbacks=[NanLossGuard(), *callbacks, *wandb_run.trainer_callbacks(args.output_dir)],
    )
    if task.accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = task.accepts_loss_kwargs
    stage = stage_label(args.output_dir)  # console: bars named after their stage, metrics into run.log
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(StageProgress(stage))
    trainer.pop_callback(PrinterCallback)  # without bars (disable_tqdm) it prints the line MetricsToLog logs
    trainer.add_callback(MetricsToLog(stage))
    return trainer
