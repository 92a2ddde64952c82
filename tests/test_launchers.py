"""Sweeps through Hydra's submitit launcher: ``hydra/launcher=slurm`` composes into valid sbatch
settings, and a local submitit sweep runs jobs end to end (the basic launcher's local multirun is
tested in test_configs.py::test_two_job_multirun_through_run_py)."""

import glob
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from helpers import CONF, FAST, write_images
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = os.path.dirname(CONF)


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _tuned_glue_job():
    """One point of the tuned GLUE sweep (trainer.bf16=true), composed as the job itself gets it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        job = compose("config", overrides=["experiment=table2_glue", "task=glue/rte", "method=lora", "seed=0"])
    job.output_dir = ""  # ${hydra:runtime.output_dir}: known only inside a Hydra run
    return job


def test_slurm_launcher_composes(monkeypatch):
    monkeypatch.delenv("PILORA_SLURM_PARTITION", raising=False)
    monkeypatch.delenv("PILORA_SLURM_ACCOUNT", raising=False)
    default = _hydra_cfg([])
    assert default.hydra.launcher._target_.endswith("BasicLauncher")  # the plugin changes nothing by default
    launcher = _hydra_cfg(["hydra/launcher=slurm"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.partition is None and launcher.account is None
    chosen = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"])
    assert (chosen.hydra.launcher.partition, chosen.hydra.launcher.timeout_min) == ("gpu", 30)
    monkeypatch.setenv("PILORA_SLURM_PARTITION", "a100")
    assert _hydra_cfg(["hydra/launcher=slurm"]).hydra.launcher.partition == "a100"


def test_slurm_launcher_keys_make_an_sbatch_script(tmp_path, monkeypatch):
    """Every key of conf/hydra/launcher/slurm.yaml is accepted by submitit and lands in sbatch
    (a stub ``srun`` on PATH stands in for a cluster; nothing is submitted)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    hcfg = _hydra_cfg(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "hydra.job.name=run",
        ]
    )
    params = OmegaConf.to_container(hcfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    folder, max_timeout = params.pop("submitit_folder"), params.pop("max_num_timeout")
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # the plugin's split of generic / slurm_ keys
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeout)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u run.py", "uid")
    for line in (
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in text, (line, text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a submitting machine without a GPU")
def test_slurm_sweep_leaves_the_gpu_checks_to_its_nodes(monkeypatch):
    """A cluster's login node has no GPU: the tuned GLUE sweep (trainer.bf16=true) and float16
    weights are submitted from it, and each job checks them on the node that runs it; everything
    else is still checked before anything is submitted."""
    from hydra_setup import check_job
    from pilora.runner.validate import check_config

    monkeypatch.setenv("PILORA_SLURM_PARTITION", "gpu")
    slurm = ["-m", "hydra/launcher=slurm"]
    assert check_job([*slurm, "experiment=table2_glue"]) is None
    assert check_job([*slurm, "model=tiny-llama", "model.dtype=float16", "method=lora"]) is None
    assert check_job([*slurm, "+trainer.bf16_full_eval=true"]) is None  # bf16 evaluation is the node's too
    # ... which this machine refuses, naming the key that was set
    assert "no GPU for trainer.bf16_full_eval=true: add trainer.bf16_full_eval=false" in check_job(
        ["+trainer.bf16_full_eval=true"]
    )
    # the same sweeps run on this machine (the basic / local submitit launchers, a single run) are refused
    for launch in (["-m"], ["-m", "hydra/launcher=submitit_local"], []):
        assert "trainer.bf16=false" in check_job([*launch, "experiment=table2_glue", "task=glue/rte", "seed=0"])
        assert "this machine has no GPU" in check_job([*launch, "model.dtype=float16"])
    # what does not depend on the machine is refused before submitting
    assert "trainer.learning_rate=-1" in check_job([*slurm, "experiment=table2_glue", "trainer.learning_rate=-1"])
    assert "trainer.use_cpu=true" in check_job([*slurm, "model.dtype=float16", "trainer.use_cpu=true"])
    assert "one of float32" in check_job([*slurm, "model.dtype=float8"])
    # and the job on a GPU-less node refuses, before it trains (what train() runs first)
    job = _tuned_glue_job()
    with pytest.raises(Exception, match="trainer.bf16=false"):
        check_config(job)


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands in a GPU without bf16 on a machine without a GPU")
def test_a_gpu_without_bf16_is_told_so(monkeypatch):
    """The bf16 GLUE settings on a GPU older than Ampere (transformers' own check, as it runs where a
    CUDA GPU is there): the message names the GPU's missing bf16 and fp16 as the other mixed precision,
    not a missing GPU."""
    import transformers.training_args

    from pilora.runner.validate import check_config

    job = _tuned_glue_job()
    with pytest.raises(Exception, match="this machine has no GPU for trainer.bf16=true"):
        check_config(job)
    monkeypatch.setattr(transformers.training_args, "is_torch_cuda_available", lambda: True)
    with pytest.raises(Exception, match="this GPU has no bf16: .* trainer.bf16=false trainer.fp16=true") as err:
        check_config(job)
    assert "no GPU" not in str(err.value)


@pytest.mark.slow
def test_run_py_prints_slurm_launcher_config():
    proc = subprocess.run(
        [sys.executable, "run.py", "hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout and "gpus_per_node: 1" in proc.stdout


@pytest.mark.slow
def test_local_submitit_sweep_runs_jobs(tmp_path):
    """The submitit launcher (the same code path as SLURM, executed as local processes)."""
    overrides = (
        FAST
        + write_images(str(tmp_path / "img"))
        + [
            "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "trainer.max_steps=2",
            "trainer.save_strategy=no",
            "method.r=2",
            "seed=0,1",
        ]
    )
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = glob.glob(f"{tmp_path}/sweep/**/results.json", recursive=True)
    assert sorted(json.load(open(r))["seed"] for r in records) == [0, 1]
    assert all(json.load(open(r))["status"] == "complete" for r in records)
    # each worker process listed its job for the closing table
    points = [json.loads(line) for line in open(f"{tmp_path}/sweep/sweep_points.jsonl")]
    assert sorted(p["folder"] for p in points) == sorted(os.path.dirname(r) for r in records)
    assert not any(p["error"] for p in points)
    assert proc.stdout.count("\nlora ") == 2  # both jobs in the table
