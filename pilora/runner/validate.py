"""Every setting of a job checked before its folder is made and before any training: top-level
values, both stages' ``TrainingArguments`` and the task's evaluation settings. A value that would
fail after stage 1, after training, or during the final evaluation fails here in seconds, and a
corrected rerun never meets a half-trained folder made from the wrong value."""

from __future__ import annotations

import types

from ..methods import METHODS
from ..tasks import FAMILIES, DataError

# seeds go to random, numpy (0 <= seed < 2**32) and torch
SEED_RANGE = (0, 2**32 - 1)
# top-level keys that must be real booleans: YAML / Hydra read `resume=no` as the string "no",
# which is truthy, so the job would resume when asked not to
BOOL_KEYS = ("resume", "save_adapter")
# TrainingArguments counts that TrainingArguments accepts at 0 but that fail (or divide by zero)
# once training starts
POSITIVE_TRAINER_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


class ConfigError(ValueError):
    """A config value that cannot run: the message names the key, the value and the fix."""


def check_top_level(cfg: dict) -> None:
    for key in BOOL_KEYS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise ConfigError(f"{key} must be true or false, got {cfg[key]!r}: set {key}=true or {key}=false")
    seed = cfg.get("seed", 0)
    low, high = SEED_RANGE
    if isinstance(seed, int) and not isinstance(seed, bool) and not low <= seed <= high:
        raise ConfigError(
            f"seed={seed} is outside {low}..{high} (numpy and torch take seeds in that range): "
            "set seed=<integer from 0 to 4294967295>, e.g. seed=0"
        )


def check_trainer(cfg: dict, method) -> None:
    """Build the ``TrainingArguments`` of every stage this job runs, so that a combination that
    ``TrainingArguments`` refuses (``eval_strategy=epoch`` + ``load_best_model_at_end`` + step
    saving) fails before stage 1 instead of after it."""
    from .train import stage1_overrides
    from .trainer_args import training_args

    if cfg["trainer"].get("save_only_model") and cfg["trainer"].get("save_strategy", "no") != "no":
        raise ConfigError(
            "trainer.save_only_model=true writes checkpoints without optimizer, scheduler and RNG state: "
            "an interrupted job could not resume as it was. Drop it (or trainer.save_strategy=no to save no checkpoints)"
        )
    for key in POSITIVE_TRAINER_KEYS:
        value = cfg["trainer"].get(key)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) and value < 1:
            raise ConfigError(f"trainer.{key}={value!r} must be at least 1: set trainer.{key}=<integer >= 1>")
    family = FAMILIES.get((cfg.get("task") or {}).get("family"))
    task = types.SimpleNamespace(remove_unused_columns=getattr(family, "remove_unused_columns", True))
    stages = {"training": {}}
    if METHODS[method.name].runs_stage1(method):
        stages = {"stage 1": stage1_overrides(method), "stage 2": {}}
    for stage, overrides in stages.items():
        try:
            training_args(cfg, task, "/nonexistent/pilora-validate", **overrides)
        except ValueError as err:
            hint = ""
            if cfg["trainer"].get("bf16") and "support bf16" in str(err):  # the tuned GLUE / vision settings
                hint = "; this machine has no GPU for trainer.bf16=true: add trainer.bf16=false to train in fp32"
            raise ConfigError(f"{stage}: {' '.join(str(err).split())}{hint}") from None  # one line


def check_task(cfg: dict) -> None:
    """The task family's own settings (:meth:`pilora.tasks.Task.check_config`), e.g. the commonsense
    evaluation's limit, batch size, generation keys and test files."""
    family = FAMILIES.get((cfg.get("task") or {}).get("family"))
    check = getattr(family, "check_config", None)
    if check is not None:
        try:
            check(cfg["task"])
        except DataError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None


def validate(cfg: dict, method) -> None:
    """All of the above, for the plain config ``cfg`` and its typed ``method``; raises :class:`ConfigError`."""
    check_top_level(cfg)
    check_trainer(cfg, method)
    check_task(cfg)


def check_config(cfg) -> None:
    """:func:`validate` for a composed config (an OmegaConf node or a dict), as ``run.py`` runs it
    before Hydra makes the job's folder."""
    import logging

    from .train import _method_settings, _plain

    quiet = logging.getLogger("pilora")
    was, quiet.disabled = quiet.disabled, True  # the job itself logs what is ignored, once
    try:
        method, plain, _ = _method_settings(_plain(cfg))
    finally:
        quiet.disabled = was
    validate(plain, method)
