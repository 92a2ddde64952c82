"""A job's inputs are identified by their content, not by where they lie or their mtime, and a job
requeued on another node takes its folder over at once (see pilora.runner.jobdir)."""

import json
import os
import shutil
import socket
import time

import pytest
from helpers import FAST, compose_cfg, write_images

from pilora.runner import jobdir
from pilora.runner.jobdir import JobLock, JobLocked, StaleJob
from pilora.runner.train import train


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(jobdir, "HASH_CACHE", str(tmp_path / "hash-cache.json"))
    monkeypatch.setattr(jobdir, "_digests", {})
    monkeypatch.setattr(jobdir, "_cache_loaded", False)


def _vision(img):
    return FAST + write_images(str(img)) + ["method=lora", "trainer.num_train_epochs=1"]


def _png(img):
    return os.path.join(img, "train", "0", "0.png")


def test_touch_copy_and_new_root_reuse_the_record_and_a_same_size_edit_is_caught(tmp_path):
    """`touch img/**` ; `cp -r img scratch/img && run.py task.dataset.data_dir=scratch/img` ; an
    edit that keeps size and mtime (`touch -r`)."""
    img, out = tmp_path / "img", tmp_path / "run"
    base = _vision(img)
    first = train(compose_cfg(base, out))
    assert first["status"] == "complete"
    # `touch` every input file: same bytes, new mtimes
    later = time.time() + 5
    for here, _, names in os.walk(img):
        for n in names:
            os.utime(os.path.join(here, n), (later, later))
    assert train(compose_cfg(base, out)) == first
    # a fresh copy of the data elsewhere (node-local scratch), named by another data_dir
    copy = tmp_path / "scratch" / "img"
    shutil.copytree(img, copy)
    moved = [o for o in base if not o.startswith("task.dataset.data_dir=")] + [f"task.dataset.data_dir={copy}"]
    assert train(compose_cfg(moved, out)) == first
    # a same-size edit whose mtime is set back: the content differs, the record is not returned
    victim = _png(copy)
    st = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    data[-20] ^= 0xFF
    with open(victim, "wb") as f:
        f.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_size == st.st_size and os.stat(victim).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(StaleJob, match=r"input\.task\.dataset\.data_dir content \(was dir .*sha256"):
        train(compose_cfg(moved, out))


def test_digests_are_cached_per_file_version(tmp_path):
    """Hashing runs once per file version: a second identity of unchanged files reads the cache,
    a rewrite with the same size and mtime is hashed again (its ctime moved)."""
    f = tmp_path / "data.json"
    f.write_text('{"a": 1}')
    first = jobdir._identity(str(f))
    jobdir._save_cache()
    cached = json.loads(open(jobdir.HASH_CACHE).read())
    assert cached[str(f)][1] == first["sha256"]
    # a forged cache entry for the current stat key is trusted: the cache is really consulted
    cached[str(f)][1] = "0" * 64
    json.dump(cached, open(jobdir.HASH_CACHE, "w"))
    jobdir._digests.clear()
    jobdir._cache_loaded = False
    assert jobdir._identity(str(f))["sha256"] == "0" * 64
    st = os.stat(f)
    time.sleep(0.01)
    f.write_text('{"a": 2}')
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = jobdir._identity(str(f))
    assert again["sha256"] not in (first["sha256"], "0" * 64)


def test_a_manifest_from_before_content_digests_is_still_compared(tmp_path):
    """A job.json with size + mtime identities (made before digests) is judged as it was made."""
    data = tmp_path / "train.json"
    data.write_text("[]")
    out = tmp_path / "run"
    out.mkdir()
    cfg = {"seed": 0, "task": {"train_file": str(data)}, "output_dir": str(out)}
    st = os.stat(data)
    legacy = {
        "config": {"seed": 0, "task": {"train_file": str(data)}},
        "inputs": {"task.train_file": {"path": str(data), "size": st.st_size, "mtime_ns": st.st_mtime_ns}},
    }
    (out / jobdir.MANIFEST).write_text(json.dumps(legacy))
    (out / "stage1").mkdir()  # what that job trained (a folder with its manifest alone is free to take)
    jobdir.check_reusable(cfg, str(out))  # same file: reusable
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleJob, match=r"input\.task\.train_file\.mtime_ns"):
        jobdir.check_reusable(cfg, str(out))


def _other_host_holder(folder, age_s=1.0):
    (folder / jobdir.LOCK_FILE).write_text(
        json.dumps({"host": "node-17", "pid": 4242, "heartbeat": time.time() - age_s})
    )


def test_requeue_on_another_node_takes_the_lock_at_once(tmp_path, monkeypatch, caplog):
    """A job requeued on node B after node A died: `.lock` names node A with a fresh heartbeat,
    but flock (which NFS/GPFS carry between nodes) was free, so node A holds nothing."""
    _other_host_holder(tmp_path)
    with caplog.at_level("WARNING", logger="pilora"):
        lock = JobLock(str(tmp_path)).acquire()
    try:
        assert json.loads((tmp_path / jobdir.LOCK_FILE).read_text())["host"] == socket.gethostname()
        assert "taking over the stale lock of pid 4242 on host node-17" in caplog.text
    finally:
        lock.release()
    # where flock stays on one node (PILORA_LOCK_FLOCK=node-local) the heartbeat still decides
    monkeypatch.setattr(jobdir, "FLOCK_NODE_LOCAL", True)
    _other_host_holder(tmp_path)
    with pytest.raises(JobLocked, match="pid 4242 on host node-17"):
        JobLock(str(tmp_path)).acquire()
    _other_host_holder(tmp_path, age_s=10 * jobdir.STALE_S)
    JobLock(str(tmp_path)).acquire().release()


def test_adapter_and_checkpoint_weights_follow_the_umask(tmp_path):
    """`umask 022; run.py method=pilora ...`: safetensors writes 0600 by itself, so the group of a
    shared disk could read the record but not adapter/, adapter_pilora/ or the checkpoints."""
    old = os.umask(0o022)
    try:
        base = (
            FAST
            + write_images(str(tmp_path / "img"))
            + [
                "method=pilora",
                "method.stage1.max_steps=2",
                "method.importance_interval=1",
                "trainer.max_steps=2",
                "trainer.save_strategy=steps",
                "+trainer.save_steps=1",
            ]
        )
        train(compose_cfg(base, tmp_path / "run"))
    finally:
        os.umask(old)
    modes = {
        os.path.relpath(os.path.join(here, n), tmp_path / "run"): os.stat(os.path.join(here, n)).st_mode & 0o777
        for here, _, names in os.walk(tmp_path / "run")
        for n in names
        if n.endswith((".safetensors", ".pt", ".pth", ".json"))
    }
    assert {"adapter/adapter_model.safetensors", "adapter_pilora/pilora_model.safetensors"} <= set(modes)
    assert any(k.startswith("stage2/checkpoint-") and k.endswith(".safetensors") for k in modes)
    assert {k: m for k, m in modes.items() if m != 0o644} == {}
