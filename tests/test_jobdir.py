"""The job folder on a shared cluster: one writer per job (lock), a folder is reused only for the
config (and input files) that made it, ``resume=false`` starts clean, folder names stay inside the
output root."""

import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import FAST, compose_cfg, interrupt_during_training, write_images

from pilora.runner import jobdir
from pilora.runner.checkpoints import resume_point
from pilora.runner.jobdir import JobLock, JobLocked, StaleJob
from pilora.runner.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _vision(img, *extra):
    return FAST + write_images(str(img)) + ["method=lora", "trainer.num_train_epochs=1", *extra]


# -- one writer per job ----------------------------------------------------------------------------
@pytest.mark.slow
def test_second_copy_of_a_running_job_stops_and_names_the_holder(tmp_path):
    """Two processes on one job: the second exits non-zero naming the first; the first finishes
    untouched (its in-progress checkpoints are not removed)."""
    out = tmp_path / "run"
    args = _vision(
        tmp_path / "img", "trainer.num_train_epochs=2", "trainer.save_strategy=steps", "+trainer.save_steps=1"
    ) + [f"hydra.run.dir={out}"]
    env = {**ENV, "PILORA_SLOW_STAGE": "train", "PILORA_STEP_DELAY": "3"}  # the second copy starts meanwhile
    first = subprocess.Popen(
        [sys.executable, "tests/slow_run.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.time()
        while not (out / "train" / "checkpoint-1" / "trainer_state.json").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "run.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
        )
        assert second.returncode != 0
        assert f"is being written by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    rec = json.load(open(out / "results.json"))
    assert rec["status"] == "complete" and rec["steps"] == 6
    assert os.path.getsize(out / jobdir.LOCK_FILE) == 0  # released: names no holder


def test_lock_is_released_and_the_same_command_then_reuses_the_record(tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(_vision(tmp_path / "img"), out)
    first = train(cfg)
    assert os.path.getsize(out / jobdir.LOCK_FILE) == 0  # no holder named after the job
    again = train(cfg)
    # the same timing proves nothing was retrained: a rerun would have timed itself anew
    assert again["timing"] == first["timing"] and again["metrics"] == json.loads(json.dumps(first["metrics"]))


class _LiveHolder:
    """Another process holding the job folder's lock (as a running job does), after this test wrote
    the folder's manifest for ``cfg`` (as that job would have)."""

    def __init__(self, cfg, out):
        from pilora.runner.train import _method_settings, _plain

        _, job_cfg, _ = _method_settings(_plain(cfg))
        os.makedirs(out, exist_ok=True)
        jobdir.check_reusable(job_cfg, str(out))
        code = "import sys, time; from pilora.runner.jobdir import JobLock; JobLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_a_sweep_point_repeating_a_running_one_is_a_duplicate_not_an_error(tmp_path):
    """A parallel launcher can run two identical sweep points (one folder) at once: the second returns a
    ``duplicate`` record naming the folder and writes nothing. Outside a sweep, or with another config,
    the holder still stops it (``JobLocked``)."""
    from pilora.runner.train import objective

    out = tmp_path / "run"
    cfg = compose_cfg(_vision(tmp_path / "img"), out)
    with _LiveHolder(cfg, out) as holder:
        before = sorted(os.listdir(out))
        rec = train(cfg, sweep=True)
        assert rec["status"] == "duplicate" and rec["output_dir"] == str(out)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in rec["holder"]
        assert objective(rec) != objective(rec)  # NaN: the twin reports the value
        assert sorted(os.listdir(out)) == before  # nothing written or removed
        with pytest.raises(JobLocked, match=f"pid {holder.pid}"):
            train(cfg)  # not a sweep: a second copy of a running job
        other = compose_cfg(_vision(tmp_path / "img", "trainer.learning_rate=0.001"), out)
        with pytest.raises(JobLocked, match=f"pid {holder.pid}"):
            train(other, sweep=True)  # a different config in the same folder is no twin


@pytest.mark.slow
def test_run_py_sweep_reports_a_repeated_point_and_exits_cleanly(tmp_path):
    """``run.py -m``: the point whose twin holds its folder exits 0 and says where the result is."""
    sweep = tmp_path / "sweep"
    args = _vision(tmp_path / "img")
    with _LiveHolder(compose_cfg(args, sweep / "job"), sweep / "job") as holder:
        run = subprocess.run(
            [sys.executable, "run.py", "-m", *args, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert f"is being written by pid {holder.pid}" in said and "this job's result" in said
    assert not (sweep / "job" / "results.json").exists()


@pytest.mark.slow
def test_a_failing_sweep_point_ends_itself_not_the_sweep(tmp_path):
    """``run.py -m seed=2,1`` where point seed=2 stops on a fixable error (its folder holds another
    config's run): seed=1 still trains, the closing table lists this multirun's jobs only (not the
    seed=0 job of an earlier sweep into the same folder), the failed point is named with its error,
    and the multirun exits 1. Rerun after the fix, the finished point is reused."""
    sweep = tmp_path / "sweep"
    args = _vision(tmp_path / "img", "trainer.max_steps=2", "save_adapter=false")
    args += [f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=s${seed}"]

    def multirun(seeds):
        return subprocess.run(
            [sys.executable, "run.py", "-m", *args, f"seed={seeds}"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = multirun("0")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(sweep / "s0", sweep / "s2")  # s2 holds another config's (seed 0) finished run
    second = multirun("2,1")
    assert second.returncode == 1, second.stderr[-3000:]
    assert json.loads((sweep / "s1" / "results.json").read_text())["status"] == "complete"  # trained after s2 failed
    table = second.stdout[second.stdout.rindex("method ") :]
    rows = [line.split() for line in table.splitlines()[2:] if line.startswith("lora")]
    assert [(r[2], r[-1]) for r in rows] == [("1", "s1")]  # not s0: an earlier sweep's record
    assert "failed: s2: the job folder" in table and "holds a run of a different config" in table
    assert "error: 1 of 2 sweep points failed" in second.stderr
    points = [json.loads(line) for line in (sweep / "sweep_points.jsonl").read_text().splitlines()]
    assert [(os.path.basename(p["folder"]), bool(p["error"])) for p in points] == [("s2", True), ("s1", False)]
    # fixed (the other run moved away), the same command trains s2 and reuses s1
    shutil.rmtree(sweep / "s2")
    third = multirun("2,1")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (third.stdout + third.stderr).count("job already complete") == 1
    table = third.stdout[third.stdout.rindex("method ") :]
    assert sorted(line.split()[-1] for line in table.splitlines()[2:] if line.startswith("lora")) == ["s1", "s2"]


@pytest.mark.slow
def test_an_optuna_trial_that_fails_ends_the_search_with_one_message(tmp_path):
    """Hydra's Optuna sweeper stops at any failed trial (a NaN value raises there), so a trial's
    fixable error ends the search as a single run's does: one ``error:`` line, exit status 1, no
    traceback; the trial before it finished. (Both trials share one folder here, so the second
    finds the first's run of another learning rate: StaleJob.)"""
    sweep = tmp_path / "sweep"
    args = _vision(tmp_path / "img", "trainer.max_steps=2", "save_adapter=false")
    args += ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=t"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds a run of a different config" in errors[0], proc.stderr[-3000:]
    assert "config.trainer.learning_rate (was " in errors[0] or "config.method.dropout (was " in errors[0]
    assert json.loads((sweep / "t" / "results.json").read_text())["status"] == "complete"  # trial 1


def _holder(folder, **kw):
    (folder / jobdir.LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), **kw})
    )


def test_lock_rules_without_flock(tmp_path, monkeypatch):
    """A shared filesystem whose flock does not reach other hosts: the holder file decides by
    host + pid (same host) and heartbeat (other host)."""
    import fcntl

    def no_flock(fd, op):
        if op & fcntl.LOCK_UN:
            return
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    # other host, fresh heartbeat: live
    _holder(tmp_path, host="node-17", pid=123)
    with pytest.raises(JobLocked, match=r"being written by pid 123 on host node-17 \(heartbeat \d+ s ago\).*delete"):
        JobLock(str(tmp_path)).acquire()
    # other host, heartbeat older than the stale limit: a crashed node, taken over
    _holder(tmp_path, host="node-17", pid=123, heartbeat=time.time() - 10 * jobdir.STALE_S)
    lock = JobLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / jobdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    # same host: a live pid holds it, a dead pid does not
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, pid=live.pid)
        with pytest.raises(JobLocked, match=f"pid {live.pid}"):
            JobLock(str(tmp_path)).acquire()
        started = jobdir._start_ticks(live.pid)
        assert started is not None and started >= jobdir._start_ticks(os.getpid())
        _holder(tmp_path, pid=live.pid, started=started)  # the holder itself: live
        with pytest.raises(JobLocked, match=f"pid {live.pid}"):
            JobLock(str(tmp_path)).acquire()
        # the holder's pid now runs another process (it started at another time): taken over
        _holder(tmp_path, pid=live.pid, started=started - 1)
        JobLock(str(tmp_path)).acquire().release()
    finally:
        live.kill()
        live.wait()
    _holder(tmp_path, pid=int(dead))
    JobLock(str(tmp_path)).acquire().release()


def test_heartbeat_refreshes_while_held(tmp_path):
    lock = JobLock(str(tmp_path), heartbeat_s=0.1).acquire()
    try:
        first = json.loads((tmp_path / jobdir.LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / jobdir.LOCK_FILE).read_text())["heartbeat"] > first
        with pytest.raises(JobLocked):  # flock: another open of the same folder in this host
            JobLock(str(tmp_path)).acquire()
    finally:
        lock.release()


def test_torn_checkpoint_is_removed_only_under_the_lock(tmp_path):
    stage = tmp_path / "train"
    (stage / "checkpoint-3").mkdir(parents=True)  # no trainer_state.json: looks cut short
    assert resume_point(str(stage), True) is None
    assert (stage / "checkpoint-3").exists()  # not ours to remove
    with JobLock(str(tmp_path)):
        assert resume_point(str(stage), True) is None
    assert not (stage / "checkpoint-3").exists()


# -- stale records ---------------------------------------------------------------------------------
def test_finished_folder_with_another_config_is_not_returned(tmp_path):
    """What `experiment=sa2` after `experiment=sa` does: same folder, another learning rate."""
    out = tmp_path / "run"
    base = _vision(tmp_path / "img")
    train(compose_cfg(base, out))
    with pytest.raises(StaleJob, match=r"config\.trainer\.learning_rate \(was 0\.005, now 0\.001\).*resume=false"):
        train(compose_cfg(base + ["trainer.learning_rate=1e-3"], out))
    # logger / resume do not change results: the record is reused
    again = train(compose_cfg(base + ["logger=none"], out))
    assert again["config"]["trainer"]["learning_rate"] == 5e-3


@pytest.mark.slow
def test_changed_input_file_is_not_reused(tmp_path):
    out = tmp_path / "run"
    base = (
        FAST
        + ["method=pilora", "method.stage1.max_steps=2", "method.importance_interval=1", "trainer.num_train_epochs=1"]
        + write_images(str(tmp_path / "img"))
    )
    first = train(compose_cfg(base, tmp_path / "src1"))
    other = train(compose_cfg(base + ["seed=1"], tmp_path / "src2"))
    f1, f2 = first["pilora"]["importance_file"], other["pilora"]["importance_file"]
    train(compose_cfg(base + [f"method.importance_from={f1}"], out))
    # a sweep over two statistics files that lands in one folder
    with pytest.raises(StaleJob, match=r"method\.importance_from"):
        train(compose_cfg(base + [f"method.importance_from={f2}"], out))
    # the same path, but the file was regenerated since with other statistics (the same bytes
    # rewritten would be the same input: tests/test_input_identity.py)
    stats = torch.load(f1, weights_only=True)
    stats["meta"]["seed"] = 99
    torch.save(stats, f1 + ".new")
    os.replace(f1 + ".new", f1)
    with pytest.raises(StaleJob, match=r"input\.method\.importance_from content"):
        train(compose_cfg(base + [f"method.importance_from={f1}"], out))


def test_interrupted_folder_with_another_config_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    base = _vision(tmp_path / "img")
    train(compose_cfg(base, out))
    interrupt_during_training(out)  # killed before the record: checkpoints remain
    with pytest.raises(StaleJob, match="trainer.per_device_train_batch_size"):
        train(compose_cfg(base + ["trainer.per_device_train_batch_size=4"], out))


@pytest.mark.slow
def test_resume_false_starts_clean_including_stage1(tmp_path):
    out = tmp_path / "run"
    base = (
        FAST
        + ["method=pilora", "method.stage1.max_steps=2", "method.importance_interval=1", "trainer.num_train_epochs=1"]
        + write_images(str(tmp_path / "img"))
    )
    train(compose_cfg(base, out))
    # plant foreign statistics in place of this job's own (as a run of another config would leave)
    other = train(compose_cfg(base + ["seed=3"], tmp_path / "other"))

    shutil.copy(other["pilora"]["importance_file"], out / "importance.pt")
    (out / "stage1" / "checkpoint-99").mkdir(parents=True)
    (out / "eval" / "default").mkdir(parents=True)  # a re-scoring of the weights about to be replaced
    fresh = train(compose_cfg(base + ["trainer.learning_rate=1e-3", "resume=false"], out))
    assert not (out / "stage1" / "checkpoint-99").exists() and not (out / "eval").exists()
    assert fresh["config"]["trainer"]["learning_rate"] == 1e-3
    mine = torch.load(out / "importance.pt", weights_only=True)["modules"]
    again = train(compose_cfg(base + ["trainer.learning_rate=1e-3"], tmp_path / "check"))  # a clean run
    ref = torch.load(again["pilora"]["importance_file"], weights_only=True)["modules"]
    assert all(torch.equal(mine[k]["hits"], ref[k]["hits"]) for k in ref)
    assert fresh["pilora"]["dominant_fraction_per_module"] == again["pilora"]["dominant_fraction_per_module"]


def test_resume_false_with_a_bad_input_keeps_the_earlier_run(tmp_path):
    """``resume=false`` with a typo in the data path stops at the input check, and the finished
    run in the folder (record, adapter) is still there: cleaning waits for inputs that load."""
    out = tmp_path / "run"
    base = FAST + ["method=lora", "trainer.max_steps=2"] + write_images(str(tmp_path / "img"))
    done = train(compose_cfg(base, out))
    before = sorted(os.listdir(out))
    with pytest.raises(FileNotFoundError, match="nope"):
        train(compose_cfg(base + [f"task.dataset.data_dir={tmp_path / 'nope'}", "resume=false"], out))
    assert sorted(os.listdir(out)) == before and (out / "adapter").is_dir()
    assert json.load(open(out / "results.json")) == json.loads(json.dumps(done))


def test_a_folder_whose_job_stopped_at_its_input_check_takes_the_corrected_rerun(tmp_path):
    """A job refused before its first step (a bad path) leaves only its manifest; the rerun with the
    path fixed is that job, not 'a run of a different config'."""
    out = tmp_path / "run"
    base = FAST + ["method=lora", "trainer.max_steps=2"] + write_images(str(tmp_path / "img"))
    with pytest.raises(FileNotFoundError, match="nope"):
        train(compose_cfg(base + [f"task.dataset.data_dir={tmp_path / 'nope'}"], out))
    assert (out / "job.json").exists() and not (out / "results.json").exists()
    assert train(compose_cfg(base, out))["status"] == "complete"


# -- folder names ----------------------------------------------------------------------------------
def _dirs(overrides):
    """The run folder and the multirun folder + subfolder Hydra would use for ``overrides``."""
    from helpers import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg.hydra.run.dir, os.path.join(cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir)


def _inside(path, root):
    full = os.path.normpath(os.path.join("/base", path))
    return full.startswith(f"/base/{root}/")


def test_folder_names_cannot_leave_the_output_root():
    run, sweep = _dirs(["+method.label=../../../../../x", "+task.dataset.data_dir=/etc/../tmp/y", "sweep_name=../../z"])
    assert _inside(run, "outputs") and _inside(sweep, "multirun")
    assert ".." not in run.split("/") and ".." not in sweep.split("/")
    # a "/" in a value no longer nests folders: task, model, method, seed, overrides
    assert len(run.split("/")) == 6 and len(sweep.split("/")) == 3


def test_long_override_sets_become_prefix_plus_hash():
    many = [
        f"trainer.{k}={v}"
        for k, v in [
            ("learning_rate", 0.000123456),
            ("warmup_steps", 17),
            ("weight_decay", 0.0123),
            ("logging_steps", 3),
            ("per_device_train_batch_size", 7),
            ("per_device_eval_batch_size", 9),
            ("max_grad_norm", 0.75),
            ("num_train_epochs", 5),
            ("gradient_accumulation_steps", 2),
            ("lr_scheduler_type", "cosine"),
            ("save_total_limit", 4),
            ("dataloader_num_workers", 0),
            ("max_steps", 1234),
        ]
    ] + ["method.r=16"]
    run, sweep = _dirs(many)
    for path in (run, sweep):
        leaf = path.split("/")[-1]
        assert len(leaf.encode()) <= 255
        assert leaf.startswith("method.r=16,trainer.dataloader_num_workers=0")  # readable
    other, _ = _dirs(many[:-1] + ["method.r=8"])
    assert other.split("/")[-1] != run.split("/")[-1]  # the hash covers the full set


@pytest.mark.slow
def test_non_integer_seed_is_named_and_makes_no_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), "seed=abc", "logger=none"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "seed must be an integer, got 'abc'" in proc.stderr
    assert not (tmp_path / "outputs").exists()


# -- values named before anything runs; files readable as the umask says --------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("method.r=abc", r"method\.r must be an integer >= 1, got 'abc'"),
        ("method.r=2.5", r"method\.r must be an integer >= 1, got 2\.5"),
        ("seed=abc", r"seed must be an integer"),
    ],
)
def test_bad_numbers_are_named_before_a_folder_is_made(tmp_path, override, message):
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    out = tmp_path / "run"
    if override.startswith("method."):  # the method schema types r: Hydra names the key at composition
        with pytest.raises(ConfigCompositionException) as err:
            compose_cfg(_vision(tmp_path / "img", override), out)
        assert "full_key: method.r" in str(err.value.__cause__) and "Integer" in str(err.value.__cause__)
        cfg = OmegaConf.to_container(compose_cfg(_vision(tmp_path / "img"), out), resolve=True)
        cfg["method"]["r"] = override.split("=")[1]  # a plain dict (no Hydra): train() names it
        cfg["method"]["r"] = float(cfg["method"]["r"]) if cfg["method"]["r"] == "2.5" else cfg["method"]["r"]
    else:
        cfg = compose_cfg(_vision(tmp_path / "img", override), out)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not out.exists()


def test_records_and_statistics_follow_the_umask(tmp_path):
    from pilora import ImportanceStats
    from pilora.runner.records import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "results.json"), {"a": 1})
        ImportanceStats().save(tmp_path / "importance.pt")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "results.json").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "importance.pt").st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_a_bug_in_one_sweep_point_still_ends_with_the_table(tmp_path):
    """A point that raises an unexpected error (a bug, not a fixable setting; here a stand-in
    ``train`` that raises for seed=2) prints its traceback and ends itself: the other point still
    trains, the closing table lists it, the bug is listed as that point's error, and the multirun
    exits 1 (it ended with Hydra's traceback and no table)."""
    sweep = tmp_path / "sweep"
    args = _vision(tmp_path / "img", "trainer.max_steps=2", "save_adapter=false")
    args += [f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=s${seed}", "seed=2,1"]
    script = tmp_path / "buggy_run.py"
    script.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import pilora.runner.train as t\n"
        "_train = t.train\n"
        "def train(cfg, *a, **k):\n"
        "    if int(cfg.seed) == 2:\n"
        "        raise RuntimeError('an unforeseen failure in point seed=2')\n"
        "    return _train(cfg, *a, **k)\n"
        "t.train = train\n"
        f"sys.argv[0] = {os.path.join(ROOT, 'run.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, str(script), "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert json.loads((sweep / "s1" / "results.json").read_text())["status"] == "complete"
    table = run.stdout[run.stdout.rindex("method ") :]
    rows = [line.split() for line in table.splitlines()[2:] if line.startswith("lora")]
    assert [(r[2], r[-1]) for r in rows] == [("1", "s1")]
    assert "failed: s2: RuntimeError: an unforeseen failure in point seed=2" in table
    logs = glob.glob(str(sweep / "s2" / "*.log"))  # the job's log (Hydra names it after the script)
    for said in (run.stdout, open(logs[0]).read()):  # the bug's own traceback, on the console and in the log
        assert "Traceback (most recent call last)" in said and "an unforeseen failure" in said
    assert "error: 1 of 2 sweep points failed" in run.stderr


def test_resume_false_never_reads_the_earlier_stage1_on_any_rank(tmp_path, monkeypatch, caplog):
    """``resume=false`` into a folder that holds a finished PiLoRA run: rank 0 moves the earlier run
    away (take_clean), but the other ranks of a torchrun job may look for ``importance.pt`` before
    it has: they must run stage 1 as rank 0 does (with the old statistics they skipped it, and the
    ranks' collectives no longer matched). Here the move is withheld, as a rank other than 0 sees it."""
    import pilora.runner.train as runner

    out = tmp_path / "job"
    base = FAST + write_images(str(tmp_path / "img")) + ["method=pilora", "method.stage1.max_steps=2"]
    base += ["method.importance_interval=1", "trainer.max_steps=2"]
    assert train(compose_cfg(base, out))["status"] == "complete" and (out / "importance.pt").exists()
    monkeypatch.setattr(runner, "take_clean", lambda cfg, out: None)
    with caplog.at_level("INFO", logger="pilora"):
        again = train(compose_cfg(base + ["resume=false"], out))
    assert again["status"] == "complete"
    assert "PiLoRA stage 1: importance accumulation" in caplog.text and "already done" not in caplog.text
