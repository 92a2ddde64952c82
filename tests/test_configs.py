"""Every config composes; Hydra and the runner reject bad input with errors that say what to do."""

import glob
import itertools
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from helpers import CONF, FAST, compose_cfg, glue_overrides, write_images
from pilora.methods import MethodConfig
from pilora.tasks import FAMILIES, DataError
from pilora.train import method_config, train

ROOT = os.path.dirname(CONF)


def _names(group):
    base = os.path.join(CONF, group)
    return sorted(os.path.relpath(p, base)[:-5] for p in glob.glob(os.path.join(base, "**", "*.yaml"), recursive=True))


EXPERIMENTS = _names("experiment")
TASKS = _names("task")
METHODS = _names("method")
METHODS = [m for m in METHODS if "/" not in m]
PAPER_MODEL = {"glue": "roberta-large", "vision": "clip-vit-b32", "commonsense": "llama2-7b", "demo": "minilm-l6"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_overlay_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    method_config(cfg)  # validates the method section
    # every swept value composes too
    from omegaconf import OmegaConf
    with __import__("hydra").initialize_config_dir(config_dir=CONF, version_base="1.3"):
        hcfg = __import__("hydra").compose("config", [f"experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(hcfg.hydra.sweeper.params or {})
    for combo in itertools.product(*[[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]):
        c = compose_cfg([f"experiment={experiment}", *combo])
        mc = method_config(c)
        assert c.model.family in FAMILIES[c.task.family].model_families
        assert isinstance(mc, MethodConfig)


@pytest.mark.parametrize("task,method", list(itertools.product(TASKS, METHODS)))
def test_every_method_task_pair_composes(task, method):
    model = PAPER_MODEL[task.split("/")[0]]
    cfg = compose_cfg([f"task={task}", f"method={method}", f"model={model}"])
    mc = method_config(cfg)
    assert cfg.method.get("label", mc.name) == method and mc.alpha > 0
    assert cfg.model.family in FAMILIES[cfg.task.family].model_families


def test_paper_hyperparameters_come_from_tuned_configs():
    rte = compose_cfg(["task=glue/rte", "method=pilora", "model=roberta-large"])
    assert (rte.trainer.learning_rate, rte.trainer.num_train_epochs, rte.method.r, rte.method.supplementary_r) == (2e-4, 50, 8, 1)
    cs = compose_cfg(["experiment=table1_llama3"])
    assert cs.trainer.learning_rate == 1e-4 and cs.method.r == 32 and cs.method.alpha == 64
    # Tab. 5-7 give α = 2r for every method, MiLoRA included (its own code's α = r is an override away)
    assert compose_cfg(["method=milora", "model=roberta-large", "task=glue/sst2"]).method.alpha == 16


@pytest.mark.parametrize("override,needle", [("task=glue/nope", "glue/mrpc"), ("method=lorax", "pilora"),
                                             ("model=gpt5", "roberta-large")])
def test_unknown_choices_list_the_options(override, needle):
    with pytest.raises((MissingConfigException, ConfigCompositionException)):
        compose_cfg([override])
    proc = subprocess.run([sys.executable, "run.py", override], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and needle in proc.stderr and "choose one of" in proc.stderr


def _run(cfg):
    return train(cfg)


def test_model_that_cannot_do_the_task(tmp_path):
    cfg = compose_cfg(FAST + ["model=tiny-llama", "task=vision/eurosat"], tmp_path / "o")
    with pytest.raises(ValueError, match="cannot do task"):
        _run(cfg)
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_missing_local_file_names_path_and_hub_id(tmp_path):
    cfg = compose_cfg(FAST + ["task=glue/sst2", "model=minilm-l6", "task.dataset.path=csv",
                              f"+task.dataset.data_files.train={tmp_path}/missing.csv"], tmp_path / "o")
    with pytest.raises(DataError, match=r"missing\.csv.*nyu-mll/glue|nyu-mll/glue.*missing\.csv"):
        _run(cfg)


def test_wrong_columns_and_empty_split(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.csv").write_text("text,label\nhello,1\n")
    (d / "validation.csv").write_text("text,label\nhello,1\n")
    base = FAST + ["task=glue/sst2", "model=minilm-l6", "task.dataset.path=csv", "task.dataset.name=null",
                   f"+task.dataset.data_files.train={d}/train.csv", f"+task.dataset.data_files.validation={d}/validation.csv"]
    with pytest.raises(DataError, match=r"needs columns \['sentence'\].*text"):
        _run(compose_cfg(base, tmp_path / "o"))
    (d / "train.csv").write_text("sentence,label\n")
    (d / "validation.csv").write_text("sentence,label\nok,1\n")
    with pytest.raises(DataError, match="empty|needs split"):
        _run(compose_cfg(base, tmp_path / "o2"))
    (d / "train.csv").write_text("sentence,label\nok,7\n")
    with pytest.raises(DataError, match="label 7"):
        _run(compose_cfg(base, tmp_path / "o3"))


def test_nan_loss_stops_with_step_and_no_record(tmp_path):
    out = tmp_path / "o"
    cfg = compose_cfg(FAST + write_images(str(tmp_path / "img")) + ["method=lora", "trainer.learning_rate=1e30",
                                                                     "trainer.max_steps=6"], out)
    with pytest.raises(RuntimeError, match=r"loss became .* at step \d+; last good checkpoint"):
        _run(cfg)
    assert not os.path.exists(out / "results.json")


def test_two_job_multirun_through_run_py(tmp_path):
    overrides = FAST + write_images(str(tmp_path / "img")) + [
        "trainer.max_steps=3", "method.r=2", f"hydra.sweep.dir={tmp_path}/sweep", "seed=0,1"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", "-m", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = glob.glob(f"{tmp_path}/sweep/**/results.json", recursive=True)
    assert len(records) == 2
    import json
    seeds = sorted(json.load(open(r))["seed"] for r in records)
    assert seeds == [0, 1]
