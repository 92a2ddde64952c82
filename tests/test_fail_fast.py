"""Every task, trainer and seed setting is checked before the job's folder is made: a value that
used to fail after stage 1 or after training (before ``adapter/`` was written, so that the corrected
rerun met a StaleJob) now fails at once and leaves nothing behind."""

import json
import os

import pytest
from helpers import FAST, compose_cfg, write_commonsense, write_images

from pilora.runner.train import train
from pilora.runner.validate import ConfigError
from pilora.tasks import DataError


def _refused(overrides, out, exc, match):
    with pytest.raises(exc, match=match):
        train(compose_cfg(overrides, out))
    assert not os.path.exists(out)  # no folder: nothing trained, nothing to be stale about


@pytest.fixture
def commonsense(tmp_path):
    return FAST + write_commonsense(str(tmp_path / "cs")), tmp_path / "cs"


@pytest.mark.parametrize(
    "override, match",
    [
        ("task.eval_limit=abc", r"task\.eval_limit must be an integer >= 1 or null, got 'abc'"),
        ("task.eval_batch_size=0", r"task\.eval_batch_size must be an integer >= 1.*got 0"),
        ("+task.generation.num_beam=2", r"task\.generation\.num_beam is not a .*GenerationConfig.*num_beams"),
        ("task.eval_weights=merged", r"task\.eval_weights='merged' is not an evaluation mode; choose one of"),
        ("task.lm_eval=yes", r"task\.lm_eval must be true or false, got 'yes'"),
    ],
)
def test_evaluation_settings_fail_before_training(tmp_path, commonsense, override, match):
    """`run.py task=commonsense/commonsense170k task.eval_limit=abc` (and the others) stop before stage 1."""
    base, _ = commonsense
    _refused(base + ["method=pilora", override], tmp_path / "run", ConfigError, match)


@pytest.mark.parametrize("damage", ["truncated", "missing", "not_records"])
def test_a_bad_test_file_fails_before_training(tmp_path, commonsense, damage):
    """`run.py task=commonsense/...` with dataset/piqa/test.json truncated by a broken download,
    deleted, or holding something else than records."""
    base, root = commonsense
    test = root / "dataset" / "piqa" / "test.json"
    if damage == "truncated":
        test.write_bytes(test.read_bytes()[:-40])
        match = r"test set 'piqa': '.*piqa/test\.json' is not valid JSON \(truncated\?\).*~task\.eval_sets\.piqa"
    elif damage == "missing":
        test.unlink()
        match = r"test set 'piqa': '.*piqa/test\.json' does not exist"
    else:
        test.write_text(json.dumps({"rows": []}))
        match = r"is not a non-empty JSON list of records"
    _refused(base, tmp_path / "run", DataError, match)


def test_stage2_trainer_settings_fail_before_stage1(tmp_path):
    """`run.py method=pilora trainer.eval_strategy=epoch trainer.load_best_model_at_end=true
    trainer.save_strategy=steps`: TrainingArguments refuses stage 2's settings; stage 1 (no
    evaluation) would have accepted them and trained first."""
    base = FAST + write_images(str(tmp_path / "img")) + ["method=pilora", "method.stage1.max_steps=2"]
    bad = ["trainer.eval_strategy=epoch", "+trainer.load_best_model_at_end=true", "trainer.save_strategy=steps"]
    _refused(base + bad, tmp_path / "run", ConfigError, r"stage 2: invalid trainer settings.*load_best_model_at_end")


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.per_device_train_batch_size=0", r"trainer\.per_device_train_batch_size=0 must be at least 1"),
        ("trainer.gradient_accumulation_steps=-1", r"trainer\.gradient_accumulation_steps=-1 must be at least 1"),
        ("seed=-1", r"seed=-1 is outside 0\.\.4294967295"),
        ("seed=99999999999", r"seed=99999999999 is outside"),
        ("resume=no", r"resume must be true or false, got 'no'"),
        ("save_adapter=0", r"save_adapter must be true or false, got 0"),
    ],
)
def test_trainer_seed_and_switches_are_checked(tmp_path, override, match):
    """`run.py trainer.per_device_train_batch_size=0`, `seed=-1`, `resume=no` (a string, which
    would have resumed), ..."""
    base = FAST + write_images(str(tmp_path / "img")) + ["method=lora"]
    _refused(base + [override], tmp_path / "run", ConfigError, match)
