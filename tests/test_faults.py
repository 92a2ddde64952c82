"""Faults: a job SIGKILLed in stage 1 or stage 2 resumes, on rerunning the same command, to the
result of an uninterrupted run; a record write that dies leaves the old record; a corrupted
checkpoint is named instead of being trained on."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import FAST, ROUNDING_STABLE_ADAM, compose_cfg, interrupt_during_training, write_images

from pilora import ImportanceStats
from pilora.importance import ModuleStats
from pilora.partition import partition
from pilora.runner import records
from pilora.runner.records import RecordWriteError, atomic_write_json
from pilora.runner.train import CorruptCheckpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _job(img):
    """PiLoRA, tiny CLIP: stage 1 = 4 steps, stage 2 = 2 epochs x 3 steps, a checkpoint every step."""
    return (
        FAST
        + write_images(img)
        + [
            "method=pilora",
            "method.stage1.max_steps=4",
            "method.importance_interval=1",
            "trainer.num_train_epochs=2",
            "trainer.save_strategy=steps",
            "+trainer.save_steps=1",
            ROUNDING_STABLE_ADAM,
        ]
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (one per module: both kill cases compare against it)."""
    d = tmp_path_factory.mktemp("ref")
    overrides = _job(str(d / "img"))
    proc = subprocess.run(
        [sys.executable, "run.py", *overrides, f"hydra.run.dir={d / 'run'}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return overrides, d / "run", json.load(open(d / "run" / "results.json"))


def _kill_when(cmd, ready, env, timeout=300):
    """Start ``cmd``, SIGKILL it once ``ready()``; returns the seconds it lived (a bound on any
    time it recorded)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(
                    f"job ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()[-3000:]}"
                )
            if time.time() - t0 > timeout:
                raise AssertionError("job never reached the point to kill it")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return time.time() - t0


def _rerun(args):
    """The same command again, uninterrupted; returns the seconds it took."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.time() - t0


def _assert_cost_within(rec, killed_s, rerun_s):
    """The cost adds the killed segment's time to the rerun's, and each is bounded by the wall time
    the process lived. (Bounds from this job's own clocks: a ratio to the reference run's times
    failed when the two ran under different load on a 2-core machine.)"""
    t = rec["timing"]
    assert t["total_s"] >= t["stage1_s"] + t["stage2_s"]
    assert t["total_s"] <= killed_s + rerun_s


def _tie_flips(a: ImportanceStats, b: ImportanceStats) -> dict[str, int]:
    """Rows whose hit count differs between two runs' statistics, per module, after checking that
    the runs made the same checks of the same gradients: ``T`` equal and ``ΣS`` equal to rounding.

    A hit is ``S_i > mean(S)`` (Alg. 1 line 10), a threshold: a rounding difference in one check
    flips a row that lies at its layer's mean, by one hit. (CI once saw this after a stage-1 resume,
    on one row of one module; this machine's runs are bit-identical.) A lost or repeated check
    changes ``T`` or ``ΣS``, and the hits of about half the rows of every module.
    """
    assert a.modules.keys() == b.modules.keys()
    rows = sum(s.shape[0] for s in b.modules.values())
    flips = {}
    for name, want in b.modules.items():
        got = a.modules[name]
        assert got.checks == want.checks, name
        # one check is a fraction 1/T of ΣS, so a lost or repeated check moves it by percents
        torch.testing.assert_close(got.score_sum, want.score_sum, rtol=1e-4, atol=0, msg=name)
        diff = (got.hits - want.hits).abs()
        assert int(diff.max()) <= 1, name
        if int(diff.sum()):
            flips[name] = int(diff.sum())
    assert sum(flips.values()) <= max(2, rows // 100), f"more differing hit counts than ties explain: {flips}"
    return flips


def _assert_same_result(rec, out, ref_rec, ref_out):
    assert rec["status"] == "complete" and rec["steps"] == ref_rec["steps"]
    a, b = ImportanceStats.load(out / "importance.pt"), ImportanceStats.load(ref_out / "importance.pt")
    flips = _tie_flips(a, b)
    job = (ref_rec["pilora"]["partition"], ref_rec["pilora"]["partition_args"])
    assert (rec["pilora"]["partition"], rec["pilora"]["partition_args"]) == job
    got_masks, want_masks = (partition(s, job[0], **job[1]) for s in (a, b))  # the job's own partition
    moved = [name for name in want_masks if not torch.equal(got_masks[name], want_masks[name])]
    assert set(moved) <= set(flips), f"the partition moved rows whose hit count is the same: {moved}"
    assert len(rec["epochs"]) == len(ref_rec["epochs"])
    if moved:  # a flipped tie moved its row across the partition: stage 2 trained another partition
        return
    assert rec["pilora"]["dominant_fraction_per_module"] == ref_rec["pilora"]["dominant_fraction_per_module"]
    for got, want in zip(rec["epochs"], ref_rec["epochs"]):
        assert got["eval_accuracy"] == want["eval_accuracy"]
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    for key, value in ref_rec["metrics"]["test"].items():
        assert rec["metrics"]["test"][key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_sigkill_mid_stage_then_rerun_resumes(tmp_path, reference, stage):
    overrides, ref_out, ref_rec = reference
    out = tmp_path / "run"
    args = [*overrides, f"hydra.run.dir={out}"]

    def ready():  # a step-2 checkpoint of the stage is complete
        ckpt = out / stage / "checkpoint-2"
        return (ckpt / "trainer_state.json").exists() and (stage != "stage1" or (ckpt / "importance_stats.pt").exists())

    killed_s = _kill_when(
        [sys.executable, "tests/slow_run.py", *args],
        ready,
        {**ENV, "PILORA_SLOW_STAGE": stage, "PILORA_STEP_DELAY": "0.5"},
    )
    assert not (out / "results.json").exists()
    assert (out / "importance.pt").exists() == (stage == "stage2")  # killed inside the stage
    if stage == "stage2":  # stage 1 ended before the kill: its time is the one the last checkpoint saved
        last = max((out / "stage2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        stage1_saved = json.load(open(last / "pilora_cost.json"))["stages"]["stage1"]
    rerun_s = _rerun(args)
    log = (out / "run.log").read_text()
    if stage == "stage1":
        assert "importance accumulation (K=1), resuming" in log
    else:
        assert "stage 1: already done" in log and f"resuming from {out}/stage2/checkpoint-" in log
    rec = json.load(open(out / "results.json"))
    _assert_same_result(rec, out, ref_rec, ref_out)
    # the cost covers both segments
    if stage == "stage1":  # two steps slowed by 0.5 s each were timed before the kill
        assert rec["timing"]["stage1_s"] >= 1.0
    else:
        assert rec["timing"]["stage1_s"] == pytest.approx(stage1_saved)
    _assert_cost_within(rec, killed_s, rerun_s)


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_after_the_final_checkpoint_only_evaluates_and_saves(tmp_path, reference):
    """Killed during the final adapter save: the rerun trains no further step, and ends with the
    uninterrupted run's steps, weights and metrics, and the first segment's training time."""
    overrides, ref_out, ref_rec = reference
    out = tmp_path / "run"
    args = [*overrides, f"hydra.run.dir={out}"]
    marker = tmp_path / "saving"
    killed_s = _kill_when(
        [sys.executable, "tests/slow_run.py", *args], marker.exists, {**ENV, "PILORA_SLOW_SAVE": str(marker)}
    )
    final = out / "stage2" / f"checkpoint-{ref_rec['steps']}"
    saved = json.load(open(final / "pilora_cost.json"))
    assert not (out / "results.json").exists()
    rerun_s = _rerun(args)
    assert "saved after the last training step: loading it, no further training" in (out / "run.log").read_text()
    rec = json.load(open(out / "results.json"))
    _assert_same_result(rec, out, ref_rec, ref_out)
    assert rec["train_loss"] == ref_rec["train_loss"]
    got, want = _adapter(out), _adapter(ref_out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # times come from the killed segment's checkpoint, not from the rerun's few seconds
    assert rec["timing"]["stage1_s"] == pytest.approx(saved["stages"]["stage1"])
    # stage 2 as saved at its last step, plus the end-of-epoch evaluation that followed that save
    assert (
        saved["job_s"] - saved["started"]["stage2"]
        <= rec["timing"]["stage2_s"]
        < saved["job_s"] - saved["started"]["stage2"] + 5
    )
    assert rec["timing"]["total_s"] >= saved["job_s"] + rec["timing"]["final_eval_s"] - 0.01
    assert rec["peak_memory_mb"] >= saved["peak_memory_mb"]
    _assert_cost_within(rec, killed_s, rerun_s)


def test_tie_flips_tell_a_rounding_tie_from_a_lost_check():
    """The resume comparison's tolerance: one row at its layer's mean may flip one hit; a check that
    is lost, or whose scores changed beyond rounding, fails."""
    gen = torch.Generator().manual_seed(0)
    checks = [torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(4)]
    # check 3: row 3 lies exactly at the mean (dyadic values sum exactly)
    checks[2] = torch.tensor([0.125, 0.875, 0.25, 0.5, 0.75, 0.375, 0.5625, 0.5625], dtype=torch.float64)

    def stats(scores):
        s = ModuleStats.empty(8, 4, snapshot_shape=None)
        for x in scores:
            s.update(x)
        return ImportanceStats({"layer": s})

    ref = stats(checks)
    tie = [x.clone() for x in checks]
    tie[2][3] += 1e-12  # last-bit rounding: row 3 now beats the mean
    assert _tie_flips(stats(tie), ref) == {"layer": 1}
    assert _tie_flips(stats(checks), ref) == {}
    with pytest.raises(AssertionError):
        _tie_flips(stats(checks[:3]), ref)  # a lost check
    with pytest.raises(AssertionError):
        _tie_flips(stats([checks[0], checks[1], checks[1], checks[3]]), ref)  # a repeated step's scores


def test_killed_record_write_keeps_previous_record(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(str(path), {"status": "complete", "metrics": {"final": {"eval_accuracy": 0.5}}})
    before = path.read_bytes()

    def dies_midway(obj, f, **kw):
        f.write('{"status": "comp')  # part of the new record reaches the disk ...
        f.flush()
        raise KeyboardInterrupt  # ... then the job is interrupted

    monkeypatch.setattr(records.json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(str(path), {"status": "complete", "metrics": {}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["results.json"]
    monkeypatch.undo()

    def replace_fails(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(records.os, "replace", replace_fails)
    with pytest.raises(RecordWriteError, match=r"results\.json.*Input/output error.*previous record is unchanged"):
        atomic_write_json(str(path), {"status": "complete", "metrics": {}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["results.json"]


@pytest.fixture
def finished_job(tmp_path):
    """A completed in-process job with step checkpoints, its record removed (as if killed at the end)."""
    overrides = _job(str(tmp_path / "img"))
    out = tmp_path / "run"
    rec = train(compose_cfg(overrides, out))
    interrupt_during_training(out)
    return overrides, out, rec


@pytest.mark.parametrize("victim", ["optimizer.pt", "adapter_model.safetensors"])
def test_truncated_checkpoint_file_is_named(finished_job, victim):
    overrides, out, _ = finished_job
    last = out / "stage2" / "checkpoint-6"
    size = os.path.getsize(last / victim)
    with open(last / victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptCheckpoint, match=rf"checkpoint '.*checkpoint-6' is corrupted: {victim} cannot be read"):
        train(compose_cfg(overrides, out))
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(
    "victim, what",
    [("optimizer.pt", "optimizer state"), ("scheduler.pt", "lr scheduler state"), ("rng_state.pth", "RNG state")],
)
def test_a_checkpoint_that_lost_its_training_state_is_refused_not_resumed_fresh(finished_job, victim, what):
    """Without optimizer.pt (or scheduler.pt, rng_state.pth) the Trainer would resume with fresh
    AdamW moments (a fresh schedule, another data order) and finish 'complete' with other weights."""
    overrides, out, _ = finished_job
    os.remove(out / "stage2" / "checkpoint-6" / victim)
    with pytest.raises(CorruptCheckpoint, match=rf"checkpoint '.*checkpoint-6' has no {what}.*Delete"):
        train(compose_cfg(overrides, out))
    assert not (out / "results.json").exists()


def test_save_only_model_checkpoints_are_refused_before_training(tmp_path):
    from pilora.runner.validate import ConfigError

    with pytest.raises(ConfigError, match=r"save_only_model=true writes checkpoints without optimizer"):
        train(compose_cfg(_job(str(tmp_path / "img")) + ["+trainer.save_only_model=true"], tmp_path / "run"))


def test_checkpoint_cut_short_while_saving_falls_back(finished_job, caplog):
    """A job killed while Trainer was saving leaves a checkpoint without trainer_state.json (written
    last): it is dropped and the job resumes from the checkpoint before, to the same result."""
    overrides, out, rec = finished_job
    last = out / "stage2" / "checkpoint-6"
    os.remove(last / "trainer_state.json")
    with caplog.at_level("WARNING", logger="pilora"):
        resumed = train(compose_cfg(overrides, out))
    assert f"checkpoint {last} was cut short while being saved; removing it" in caplog.text
    assert (last / "trainer_state.json").exists()  # step 6 trained again from checkpoint-5 and saved
    assert resumed["metrics"]["final"]["eval_loss"] == pytest.approx(rec["metrics"]["final"]["eval_loss"], rel=1e-6)
    assert resumed["metrics"]["test"] == pytest.approx(rec["metrics"]["test"], rel=1e-6)


def test_resume_errors_name_the_checkpoint_only_while_it_loads(finished_job, monkeypatch):
    """Loading a checkpoint that does not fit gets the 'could not resume' error; an error raised once
    training runs again is passed on unchanged, not blamed on the checkpoint."""
    import shutil

    import transformers

    overrides, out, _ = finished_job
    shutil.rmtree(out / "stage2" / "checkpoint-6")  # step 6 is left to train after resuming at 5

    def bad_rng(self, checkpoint):
        raise RuntimeError("rng state does not load")

    with monkeypatch.context() as m:
        m.setattr(transformers.Trainer, "_load_rng_state", bad_rng)
        with pytest.raises(RuntimeError, match=r"could not resume from checkpoint '.*checkpoint-5'.*rng state"):
            train(compose_cfg(overrides, out))

    def bad_step(self, *args, **kwargs):
        raise RuntimeError("a step failed")

    with monkeypatch.context() as m:
        m.setattr(transformers.Trainer, "training_step", bad_step)
        with pytest.raises(RuntimeError, match="a step failed") as info:
            train(compose_cfg(overrides, out))
        assert "could not resume" not in str(info.value)


def _poison(path, key_part="lora_B"):
    """Write NaN into one floating tensor of a safetensors file (as a bit flip or a diverged save would)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    key = next(k for k in sorted(state) if key_part in k and state[k].is_floating_point())
    state[key][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    return key


def test_nan_weights_in_a_checkpoint_are_refused_on_resume(finished_job):
    overrides, out, _ = finished_job
    last = out / "stage2" / "checkpoint-6"
    key = _poison(last / "adapter_model.safetensors")
    with pytest.raises(
        CorruptCheckpoint,
        match=rf"checkpoint '.*checkpoint-6' holds non-finite weights: "
        rf"'{key}' in adapter_model\.safetensors has 1 NaN/inf value.*"
        rf"Delete '.*checkpoint-6'",
    ):
        train(compose_cfg(overrides, out))
    assert not (out / "results.json").exists()


def test_nan_weights_make_a_failed_record(finished_job, monkeypatch):
    """Weights that are NaN at the end (here: a poisoned last checkpoint let through) give a record
    marked failed, never 'complete' with NaN metrics; a rerun does not return it as finished."""
    from pilora.runner import checkpoints

    overrides, out, _ = finished_job
    # PiLoRA's B is resumed from the compact pilora_model.safetensors (adapter_model.safetensors holds
    # its rank r + r' export for stock PEFT; A and the head are read from there)
    _poison(out / "stage2" / "checkpoint-6" / "pilora_model.safetensors")
    monkeypatch.setattr(checkpoints, "_non_finite", lambda path: None)
    rec = train(compose_cfg(overrides, out))
    assert rec["status"] == "failed" and "hold NaN/inf values" in rec["failure"]
    assert json.load(open(out / "results.json"))["status"] == "failed"
    monkeypatch.undo()
    with pytest.raises(CorruptCheckpoint, match="non-finite weights"):  # not "job already complete"
        train(compose_cfg(overrides, out))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_own_importance_file_is_regenerated(finished_job, caplog, damage):
    """The job's own importance.pt does not load: it is set aside and stage 1 runs again (from its
    checkpoints), so the rerun completes with the same statistics instead of repeating the error."""
    overrides, out, rec = finished_job
    path = out / "importance.pt"
    before = ImportanceStats.load(path)
    data = path.read_bytes()
    path.write_bytes(b"not a torch file" if damage == "garbage" else data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="pilora"):
        again = train(compose_cfg(overrides, out))
    assert f"{path} does not load" in caplog.text and "running stage 1 again" in caplog.text
    assert (out / "importance.pt.corrupt").exists()
    after = ImportanceStats.load(path)
    assert set(after.modules) == set(before.modules)
    for k, s in before.modules.items():
        assert torch.equal(after.modules[k].hits, s.hits) and after.modules[k].checks == s.checks
    assert again["status"] == "complete"
    assert again["pilora"]["dominant_fraction"] == rec["pilora"]["dominant_fraction"]
    assert again["metrics"]["test"]["test_loss"] == pytest.approx(rec["metrics"]["test"]["test_loss"], rel=1e-6)
