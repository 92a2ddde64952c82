"""Typed task settings (pilora.tasks.schema): each family declares its task.* keys once, with
types, defaults and help; an unknown key or a wrong type is an error naming the key; and every
family names the headline metric its records carry."""

import dataclasses
import glob
import os

import pytest
from helpers import CONF, compose_cfg
from omegaconf import OmegaConf

from pilora.tasks import FAMILIES
from pilora.tasks.schema import TaskSettings

TASKS = sorted(
    os.path.relpath(p, os.path.join(CONF, "task"))[:-5]
    for p in glob.glob(os.path.join(CONF, "task", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("_")
)


def _task(name):
    return OmegaConf.to_container(compose_cfg([f"task={name}"], "/nonexistent"), resolve=True)["task"]


@pytest.mark.parametrize("name", TASKS)
def test_every_task_yaml_builds_its_familys_schema_and_names_a_headline(name):
    cfg = _task(name)
    cls = FAMILIES[cfg["family"]]
    probe = cls.probe(cfg)
    assert set(cfg) <= set(probe.settings_cls.keys())
    assert set(probe.cfg) == set(probe.settings_cls.keys())  # every key, set or defaulted
    head = probe.headline()
    assert set(head) == {"metric", "split", "from"} and head["from"] in ("test", "epoch")
    expected = {"generation": "test_avg_accuracy", "vision": "test_accuracy", "classification": "eval_accuracy"}
    assert head["metric"] == expected[cfg["family"]]


def test_every_family_has_a_schema_with_help_and_a_headline():
    from pilora.tasks.base import Task

    assert set(FAMILIES) == {"classification", "generation", "vision"}
    for family, cls in FAMILIES.items():
        assert issubclass(cls.settings_cls, TaskSettings) and cls.settings_cls is not TaskSettings, family
        assert all(cls.settings_cls.help().values()), f"{family}: a key without help text"
        assert cls.headline is not Task.headline, f"{family} names no headline"


def test_a_family_without_a_headline_fails_its_check():
    """A new family that forgets headline() is refused before a job runs, not scored NaN later."""
    from pilora.tasks.base import Task

    class Headless(Task):
        family = "headless"

    with pytest.raises(NotImplementedError, match="names no headline metric"):
        Headless.check_config({"name": "x", "family": "headless"})


@pytest.mark.parametrize(
    "name, key, value, match",
    [
        (
            "glue/sst2",
            "max_len",
            64,
            r"unknown key\(s\) task\.max_len .*valid keys of task \(classification\): name, family",
        ),
        ("vision/eurosat", "holdout", 0.2, r"task\.holdout .*holdout_fraction, holdout_max"),
        ("commonsense/commonsense170k", "answer_patern", "x", r"task\.answer_patern.*answer_pattern"),
        ("glue/sst2", "max_length", "long", r"task\.max_length must be an integer >= 1, got 'long'"),
        ("vision/eurosat", "holdout_fraction", "a tenth", r"task\.holdout_fraction must be a number >= 0"),
        ("commonsense/commonsense170k", "train_on_inputs", "yes", r"task\.train_on_inputs must be true or false"),
        ("commonsense/commonsense170k", "cutoff_len", 0, r"task\.cutoff_len must be an integer >= 1, got 0"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(name, key, value, match):
    cfg = {**_task(name), key: value}
    with pytest.raises(ValueError, match=match):
        FAMILIES[cfg["family"]].probe(cfg)


def test_required_keys_and_defaults_are_declared_once():
    from pilora.tasks.vision import VisionSettings

    cfg = {k: v for k, v in _task("vision/eurosat").items() if k != "num_labels"}
    with pytest.raises(ValueError, match=r"does not set task\.num_labels"):
        VisionSettings.from_dict(cfg)
    bare = FAMILIES["generation"].probe({"name": "t", "family": "generation", "dataset": {"train_file": "f"}})
    s = bare.settings
    assert (s.val_set_size, s.val_split_seed, s.cutoff_len, s.eval_batch_size) == (120, 42, 256, 1)
    assert (s.metric, s.metric_mode, s.eval_weights, s.prompt_style, s.answer_pattern) == (
        "loss",
        "min",
        "merged_fp16",
        "llm_adapters",
        None,
    )
    assert dataclasses.is_dataclass(s) and bare.metric == "loss"


@pytest.mark.parametrize("base", ["glue/_glue", "vision/_vision", "commonsense/commonsense170k"])
def test_a_shared_task_yaml_never_contradicts_the_schema(base):
    """The shared task YAMLs keep the keys old jobs recorded (the composed config is a job's
    identity: job.json, analysis config_key); a scalar one they spell out equals the schema's default."""
    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, "task", base + ".yaml")), resolve=False)
    family = raw.get("family") or "classification"
    defaults = FAMILIES[family].settings_cls.defaults()
    spelled = {k: v for k, v in raw.items() if k in defaults and not isinstance(v, dict) and k != "defaults"}
    assert len(spelled) >= 3, spelled
    assert {k: v for k, v in spelled.items() if defaults[k] != v} == {}


# --- values checked before any folder is made (hydra_setup.check_job runs check_config) ----------

GLUE = ["task=glue/sst2", "trainer.bf16=false"]  # tuned/glue trains in bf16, which needs a GPU


def _check_job(*overrides):
    import hydra_setup

    return hydra_setup.check_job(list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a name no evaluation reports: the best epoch was silently the last and a sweep's objective NaN
        (
            [*GLUE, "task.metric=bogus"],
            "task.metric='bogus' is not a metric task 'sst2' computes per epoch; set task.metric to one of "
            "loss, accuracy (task.metrics lists what each evaluation reports, from accuracy, f1, mcc)",
        ),
        (["task=glue/cola", "trainer.bf16=false", "task.metric=f1"], "set task.metric to one of loss, accuracy, mcc"),
        (["task=vision/eurosat", "trainer.bf16=false", "task.metric=f1"], "set task.metric to one of loss, accuracy"),
        (["task=commonsense/commonsense170k", "task.metric=accuracy"], "task.metric='accuracy' is not a metric"),
        ([*GLUE, "task.metrics=[accuracy,auc]"], "task.metrics=['accuracy', 'auc'] names unknown metric(s) ['auc']"),
        # best_and_final picked min for anything but "max": the worst-accuracy epoch
        (
            [*GLUE, "task.metric_mode=bogus"],
            "task.metric_mode='bogus' is not a metric mode: set task.metric_mode=max (a higher task.metric is better",
        ),
    ],
)
def test_metric_and_metric_mode_are_checked_before_the_job_starts(overrides, message):
    error = _check_job(*overrides)
    assert error is not None and message in error, error


def test_metrics_the_family_computes_pass():
    assert _check_job("task=glue/cola", "trainer.bf16=false", "task.metric=mcc") is None
    assert _check_job(*GLUE, "task.metric=loss", "task.metric_mode=min") is None
    assert _check_job("task=glue/mrpc", "trainer.bf16=false", "task.metric=f1") is None


def test_a_bad_metric_mode_stops_the_job_before_its_folder(tmp_path):
    from pilora.runner.train import train
    from pilora.runner.validate import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"task\.metric_mode='bogus' is not a metric mode"):
        train(compose_cfg([*GLUE, "logger=none", "task.metric_mode=bogus"], out))
    assert not out.exists()


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "x {nope}",
            "task.template='x {nope}' reads the field {nope}, which is not one of task.text_columns ({sentence})",
        ),
        ("{0}", "task.template='{0}' reads the field {0}, which is not one of task.text_columns"),
        ("{}", "task.template='{}' reads the field {}, which is not one of"),
        ("{sentence[0]}", "reads the field {sentence[0]}"),
        ("x {sentence", "task.template='x {sentence' is not a valid format string (expected '}' before end of string)"),
        ("sentence", "task.template='sentence' reads no column, so every example would be the same text"),
    ],
)
def test_a_template_reads_only_the_text_columns(template, message):
    """`task.template='x {nope}'` was a KeyError on the first batch, `'{0}'` an IndexError and
    `'x {sentence'` a ValueError naming no key: now one message with the key, the field and the fix."""
    error = _check_job(*GLUE, f"task.template='{template}'")
    assert error is not None and message in error, error
    assert "write each column of task.text_columns as {sentence}, and a literal brace as {{ or }}" in error


def test_a_template_with_literal_braces_and_every_column_passes():
    assert _check_job(*GLUE, "task.template='{{x}} {sentence}'") is None
    assert _check_job("task=glue/mrpc", "trainer.bf16=false", "task.template='{sentence2} / {sentence1}'") is None


def test_model_dtype_is_a_name_torch_has():
    """`model.dtype=bogus` was `AttributeError: module 'torch' has no attribute 'bogus'` when the
    model loaded; now the choices, before the job starts (and from load_pretrained itself)."""
    from pilora.tasks.base import load_pretrained

    error = _check_job("model.dtype=bogus")
    assert error == "model.dtype='bogus' is not a weight dtype: set model.dtype to one of float32, bfloat16, float16"
    assert _check_job("model.dtype=bfloat16") is None and _check_job("model.dtype=null") is None
    with pytest.raises(ValueError, match=r"model\.dtype='bogus' is not a weight dtype"):
        load_pretrained({"dtype": "bogus", "from_config": {"model_type": "bert"}}, None)


def test_float16_weights_are_refused_without_a_gpu(monkeypatch):
    """On a CPU a float16 base trained to NaN at step 2, and the divergence message advised a lower
    learning rate; now the job is refused with the fix. With a GPU it runs (the LLaMA protocol), unless
    trainer.use_cpu=true puts it on the CPU."""
    import torch

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    error = _check_job("model.dtype=float16")
    assert error.startswith("model.dtype=float16 cannot train on a CPU (this machine has no GPU)")
    assert "Set model.dtype=float32 (or model.dtype=bfloat16)" in error
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert _check_job("model.dtype=float16") is None
    assert "(trainer.use_cpu=true)" in _check_job("model.dtype=float16", "+trainer.use_cpu=true")


# --- GLUE data files: each split's file is read and checked on its own ---------------------------


def _glue_files(tmp_path):
    from helpers import FAST, glue_overrides

    over = FAST + glue_overrides(tmp_path / "csv", n_train=24, n_val=8) + ["trainer.max_steps=2"]
    return over, tmp_path / "csv"


def _without(over, split):
    return [o for o in over if not o.startswith(f"+task.dataset.data_files.{split}=")]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_string_labels_are_named_with_their_file_in_every_split(tmp_path, split):
    """A validation CSV of string labels was `Failed to parse string: 'positive' as a scalar of type
    int64 ... Empty, truncated or malformed files` (one load of both files typed validation by
    train); the train file got the clear message. Now both do, naming the file."""
    from pilora.runner.train import train
    from pilora.tasks import DataError

    over, d = _glue_files(tmp_path)
    rows = (d / f"{split}.csv").read_text().splitlines()
    bad = d / f"{split}_words.csv"
    bad.write_text("\n".join([rows[0]] + [r[:-1] + ("positive" if r.endswith("1") else "negative") for r in rows[1:]]))
    over = _without(over, split) + [f"+task.dataset.data_files.{split}={bad}"]
    out = tmp_path / "run"
    with pytest.raises(DataError) as err:
        train(compose_cfg(over, out))
    assert str(err.value).startswith(
        f"data file '{bad}': column 'label' of split '{split}' of task 'sst2' holds str labels (e.g. "
    )
    assert "write the labels as integers 0..1" in str(err.value)
    assert not (out / "results.json").exists() and not (out / "training.json").exists()


def test_a_tsv_train_file_is_read_with_tabs(tmp_path):
    """A .tsv train file beside validation.csv was a multi-line error naming validation.csv (read
    with commas, the .tsv was one column); each file is now read with its own delimiter."""
    from omegaconf import OmegaConf

    from pilora.tasks import make_task

    over, d = _glue_files(tmp_path)
    rows = (d / "train.csv").read_text().splitlines()
    (d / "train.tsv").write_text("\n".join(r.replace(",", "\t") for r in rows) + "\n")
    cfg = compose_cfg(_without(over, "train") + [f"+task.dataset.data_files.train={d / 'train.tsv'}"], tmp_path / "o")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    data = make_task(cfg["task"], cfg["model"]).datasets()
    assert len(data["train"]) == 24 and len(data["validation"]) == 8
    assert set(data["train"]["labels"]) == {0, 1}
