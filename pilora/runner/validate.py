"""Every setting of a job checked before its folder is made and before any training: top-level
values, the model section's keys, both stages' ``TrainingArguments`` (and the bounds of the values
TrainingArguments takes but torch refuses), the logger section and the task's evaluation settings.
A value that would fail after stage 1, after training, or during the final evaluation fails here in
seconds, and a corrected rerun never meets a half-trained folder made from the wrong value."""

from __future__ import annotations

import functools
import os
import types

from ..hints import did_you_mean
from ..methods import METHODS
from ..methods.config import Key
from ..tasks import FAMILIES, DataError
from . import wandb as wandb_run

# seeds go to random, numpy (0 <= seed < 2**32) and torch
SEED_RANGE = (0, 2**32 - 1)
# top-level keys that must be real booleans: YAML / Hydra read `resume=no` as the string "no",
# which is truthy, so the job would resume when asked not to
BOOL_KEYS = ("resume", "save_adapter")
# TrainingArguments values that TrainingArguments accepts (it checks none of these) but that fail
# once the Trainer is built (torch's optimizer: "Invalid learning rate"; the DataLoader), divide by
# zero once training starts, or train nothing and record the untrained model as "complete"
TRAINER_BOUNDS = {
    "per_device_train_batch_size": Key("examples per device and step", integer=True, low=1),
    "per_device_eval_batch_size": Key("examples per device and evaluation step", integer=True, low=1),
    "gradient_accumulation_steps": Key("batches per optimizer step", integer=True, low=1),
    "learning_rate": Key("0 trains nothing; torch's optimizers refuse a negative one", low=0, open_low=True),
    "adam_beta1": Key("AdamW's first-moment decay", low=0, high=1, open_high=True),
    "adam_beta2": Key("AdamW's second-moment decay", low=0, high=1, open_high=True),
    "adam_epsilon": Key("AdamW's denominator term", low=0, open_low=True),
    "weight_decay": Key("a negative one pushes the weights away from 0", low=0),
    "dataloader_num_workers": Key("0 loads the data in the main process", integer=True, low=0),
    "num_train_epochs": Key("0 epochs train nothing", low=0, open_low=True),
}
# the TrainingArguments precision flags that TrainingArguments refuses where this machine's hardware
# lacks them (checked by a job on its own node when it runs on another machine)
PRECISION_KEYS = ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")
# bounds that do not apply when another key decides instead: with max_steps > 0 the Trainer ignores
# num_train_epochs (its usual idiom: num_train_epochs=0 with a step budget)
TRAINER_OVERRIDDEN_BY = {"num_train_epochs": "max_steps"}


def _text(value) -> bool:
    return isinstance(value, str) and value != ""


def _bounded(**bounds) -> tuple:
    """A number's entry of :data:`LOGGER_KEYS`, from the bounds a :class:`Key` checks and words."""
    bound = Key("", **bounds)
    return bound.allows, bound.bounds()


# the logger section: every key of conf/logger/wandb.yaml, as (allowed, the values in words). A
# wrong type did not stop the job where it was set: logger.tags=abc became the tags a, b, c,
# logger.artifacts=maybe counted as true, logger.artifact_max_mb=abc failed after training, and
# logger.mode=bogus failed inside wandb.init with a pydantic traceback.
LOGGER_KEYS = {
    "name": (lambda v: v in wandb_run.LOGGERS, f"one of {', '.join(wandb_run.LOGGERS)} (choose it with logger=...)"),
    "project": (_text, "a W&B project name"),
    "entity": (lambda v: v is None or _text(v), "a W&B entity (user or team) or null"),
    "mode": (
        lambda v: v in wandb_run.MODES,
        f"one of {', '.join(wandb_run.MODES)} (when logger.mode is not given: $WANDB_MODE, else offline)",
    ),
    "group": (lambda v: v is None or _text(v), "a group name or null (quote a number: logger.group='1')"),
    "run_name": (lambda v: v is None or _text(v), "a run name or null"),
    "tags": (
        lambda v: isinstance(v, list) and all(_text(t) for t in v),
        "a list of strings, e.g. logger.tags=[a,b] (a bare string would be split into its letters)",
    ),
    "artifacts": (lambda v: isinstance(v, bool), "true or false"),
    "artifact_max_mb": _bounded(low=0),  # MB
    "init_timeout_s": _bounded(low=0, open_low=True, nullable=True),  # seconds; null: 60
    "verbose": (lambda v: isinstance(v, bool), "true or false"),
}


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


def check_trainer(cfg: dict, method, device_checks: bool = True) -> None:
    """Build the ``TrainingArguments`` of every stage this job runs, so that a combination that
    ``TrainingArguments`` refuses (``eval_strategy=epoch`` + ``load_best_model_at_end`` + step
    saving) fails before stage 1 instead of after it. Without ``device_checks`` (the job runs on
    another machine) the precision flags are left to the job: TrainingArguments refuses bf16 / fp16 /
    tf32 where this machine's hardware lacks them, and a cluster's login node has no GPU."""
    from .train import stage1_overrides
    from .trainer_args import training_args

    if cfg["trainer"].get("save_only_model") and cfg["trainer"].get("save_strategy", "no") != "no":
        raise ConfigError(
            "trainer.save_only_model=true writes checkpoints without optimizer, scheduler and RNG state: "
            "an interrupted job could not resume as it was. Drop it (or trainer.save_strategy=no to save no checkpoints)"
        )
    family = FAMILIES.get((cfg.get("task") or {}).get("family"))
    task = types.SimpleNamespace(remove_unused_columns=getattr(family, "remove_unused_columns", True))
    stages = {"training": {}}
    if METHODS[method.name].runs_stage1(method):
        stages = {"stage 1": stage1_overrides(method), "stage 2": {}}
    hardware = {} if device_checks else {**dict.fromkeys(PRECISION_KEYS, False), "tf32": None}
    for stage, overrides in stages.items():
        try:
            training_args(cfg, task, "/nonexistent/pilora-validate", **overrides, **hardware)
        except ValueError as err:
            hint = ""
            bf16 = [k for k in ("bf16", "bf16_full_eval") if cfg["trainer"].get(k)]
            if bf16 and "support bf16" in str(err):  # the tuned GLUE / vision settings
                off = " ".join(f"trainer.{k}=false" for k in bf16)
                hint = (
                    # transformers names Ampere only where a CUDA GPU is there (a V100, a T4)
                    f"; this GPU has no bf16: add {off} to train in fp32, or {off} trainer.fp16=true for fp16 "
                    "mixed precision"
                    if "Ampere" in str(err)
                    else f"; this machine has no GPU for trainer.{bf16[0]}=true: add {off} to train in fp32"
                )
            raise ConfigError(f"{stage}: {' '.join(str(err).split())}{hint}") from None  # one line
    check_trainer_bounds(cfg["trainer"])


def check_trainer_bounds(trainer: dict) -> None:
    """:data:`TRAINER_BOUNDS`, on the values as TrainingArguments gets them (``'1e-4'`` converted);
    run once the keys and types are known good (the stages' ``TrainingArguments`` above)."""
    from .trainer_args import check_trainer_keys

    typed = check_trainer_keys(trainer)
    for name, bound in TRAINER_BOUNDS.items():
        other = TRAINER_OVERRIDDEN_BY.get(name)
        if typed.get(name) is None or bound.allows(typed[name]) or (other and (typed.get(other) or 0) > 0):
            continue
        also = f", or set trainer.{other} > 0 to train for that many steps" if other else ""
        raise ConfigError(
            f"trainer.{name}={trainer[name]!r} must be {bound.bounds()} ({bound.help}): change trainer.{name}{also}"
        )


def check_logger(cfg: dict) -> None:
    """Every ``logger.<key>`` is a key of :data:`LOGGER_KEYS`, with a value it allows."""
    logger = cfg.get("logger") or {}
    for name, value in logger.items():
        if name not in LOGGER_KEYS:
            raise ConfigError(
                f"logger.{name} is not a logger key"
                + did_you_mean(name, LOGGER_KEYS, prefix="logger.")
                + f"; the logger keys are: {', '.join(LOGGER_KEYS)}"
            )
        allowed, words = LOGGER_KEYS[name]
        if not allowed(value):
            raise ConfigError(f"logger.{name} must be {words}, got {value!r} ({type(value).__name__})")


@functools.cache
def model_keys() -> frozenset[str] | None:
    """The keys a ``model`` section may have: those the ``conf/model/*.yaml`` files use (every key
    the code reads is one of them: ``tests/test_bad_input.py`` checks it). None when this copy of
    the package has no ``conf/`` (a library install: the check is left out)."""
    import glob

    import yaml

    from ..paper_params import MODEL_CONF

    keys: set[str] = set()
    for path in glob.glob(os.path.join(MODEL_CONF, "*.yaml")):
        with open(path) as f:
            keys |= set(yaml.safe_load(f) or {})
    return frozenset(keys) or None


def check_model_keys(cfg: dict) -> None:
    """A ``model.<key>`` that no model reads (``+model.bogus=1``) is refused: the job would have
    trained as if it were not there."""
    known = model_keys()
    unknown = sorted(set(cfg.get("model") or {}) - (known or set()))
    if known is None or not unknown:
        return
    raise ConfigError(
        f"model.{unknown[0]} is not a model key"
        + did_you_mean(unknown[0], known, prefix="model.")
        + f"; no model reads it. The model keys (those conf/model/*.yaml use) are: {', '.join(sorted(known))}. "
        f"Drop the +model.{unknown[0]}=... override"
    )


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


def check_dtype(cfg: dict, device_checks: bool = True) -> None:
    """``model.dtype`` (:func:`pilora.tasks.base.check_model_dtype`): a name torch has, and no float16
    weights to train on a CPU, before any weights load."""
    from ..tasks.base import check_model_dtype

    try:
        check_model_dtype(cfg.get("model") or {}, cfg.get("trainer") or {}, on_this_machine=device_checks)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: dict, method, device_checks: bool = True) -> None:
    """All of the above, for the plain config ``cfg`` and its typed ``method``; raises :class:`ConfigError`.
    ``device_checks=False``: the job will run on another machine (a SLURM node), so what depends on
    this machine's GPU (bf16 / fp16 / tf32, float16 weights) is checked by the job where it runs."""
    check_top_level(cfg)
    check_model_keys(cfg)
    check_trainer(cfg, method, device_checks)
    check_logger(cfg)
    check_task(cfg)
    check_dtype(cfg, device_checks)


def check_config(cfg, device_checks: bool = True) -> None:
    """:func:`validate` for a composed config (an OmegaConf node or a dict), as ``run.py`` runs it
    before Hydra makes the job's folder (``device_checks``: as in :func:`validate`)."""
    import logging

    from .train import _method_settings, _plain

    quiet = logging.getLogger("pilora")
    was, quiet.disabled = quiet.disabled, True  # the job itself logs what is ignored, once
    try:
        method, plain, _ = _method_settings(_plain(cfg))
    finally:
        quiet.disabled = was
    validate(plain, method, device_checks)
