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
