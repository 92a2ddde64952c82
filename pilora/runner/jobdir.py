"""The job folder: who may write it (a lock), whether what is in it belongs to this config
(the job manifest), and a clean start (``resume=false``).

A job folder is reused (finished record returned, checkpoints resumed) only when the manifest
written by the job that created it (``job.json``: the resolved config and the identity of every
input file the config names) equals the new job's. Anything else stops the job with
:class:`StaleJob`, instead of silently returning or continuing a different experiment.

The lock (``.lock`` in the job folder) holds the writer's host, pid and a heartbeat. Where
``fcntl.flock`` works it decides (the kernel, or the NFS/GPFS lock manager, drops it with the
process or node), so a job requeued on another node takes over at once. On a filesystem without
flock, or whose flock stays on one node (``PILORA_LOCK_FLOCK=node-local``), a holder named in the
file is live while its heartbeat is fresh (other host) or its pid runs, started when the holder
started (same host: a pid reused by a later process is not the holder).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import threading
import time

from .records import atomic_write_json

log = logging.getLogger("pilora")

LOCK_FILE = ".lock"
MANIFEST = "job.json"
# what a job writes into its folder; resume=false removes exactly these (never anything else the
# folder may hold, e.g. Hydra's .hydra/ and run.log, or wandb/)
JOB_ARTIFACTS = (
    "results.json",
    "importance.pt",
    "importance.pt.corrupt",
    "stage1",
    "stage2",
    "train",
    "adapter",
    "adapter_pilora",
    "adapter_lora_dash",
    "adapter_init",
    "model",
    "dash_directions.pt",
    "training.json",
    "predictions",
    "eval",  # pilora.runner.evaluate's re-scorings of this run's weights: stale once it retrains
    MANIFEST,
)
# config keys that do not change what a job computes: a rerun differing only in them reuses the job
NOT_RESULT_KEYS = ("resume", "output_dir", "logger")
HEARTBEAT_S = float(os.environ.get("PILORA_LOCK_HEARTBEAT_S", "30"))
# a holder on another host whose heartbeat is older than this is taken for dead (crashed node)
STALE_S = float(os.environ.get("PILORA_LOCK_STALE_S", "300"))

# PILORA_LOCK_FLOCK=node-local: a filesystem whose flock reaches only the local node (Lustre mounted
# with localflock); there a holder on another host is judged by its heartbeat even when our flock
# succeeded. Elsewhere an acquired flock proves the previous holder gone.
FLOCK_NODE_LOCAL = os.environ.get("PILORA_LOCK_FLOCK", "") == "node-local"

_held: dict[str, "JobLock"] = {}


class JobLocked(RuntimeError):
    """Another live process writes this job folder; ``holder`` describes it."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


class StaleJob(RuntimeError):
    """The job folder holds a run of a different config (or of changed input files)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat`` field 22): a pid
    reused by a later process (after the holder died, or after a reboot) has another. None where
    there is no ``/proc`` (macOS) or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return int(text.rpartition(")")[2].split()[19])  # the fields after the (name), which may hold spaces
    except (OSError, ValueError, IndexError):
        return None


class JobLock:
    """Exclusive writer lock of one job folder; use as a context manager."""

    def __init__(self, folder: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._fd = None
        self._stop = threading.Event()
        self._thread = None
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_ticks(os.getpid())}

    # -- holder file ------------------------------------------------------------------------
    def _read_holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                text = f.read()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def _write_holder(self) -> None:
        data = json.dumps({**self.info, "heartbeat": time.time()}).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        try:
            os.fsync(self._fd)  # pushes the heartbeat to other hosts of a shared filesystem sooner
        except OSError:
            pass

    def _holder_alive(self, holder: dict, flocked: bool) -> bool:
        if flocked and not FLOCK_NODE_LOCAL:
            # a live holder, on any host, would hold the flock we just got (local disks, NFS and
            # GPFS carry flock between hosts): it is gone, e.g. a job requeued on another node
            # after its first node died, whose heartbeat may still look fresh
            return False
        if holder.get("host") == self.info["host"]:
            if flocked or holder.get("pid") == self.info["pid"]:
                # a live holder on this host would hold the flock we just got: it is gone (its pid may
                # even run another program by now)
                return False
            pid = int(holder.get("pid", -1))
            if holder.get("started") is not None and _start_ticks(pid) not in (None, holder["started"]):
                return False  # that pid is another process now: the holder is gone
            return _pid_alive(pid)
        return time.time() - float(holder.get("heartbeat", 0)) < self.stale_s

    @staticmethod
    def describe(holder: dict | None) -> str:
        if not holder:
            return "another process"
        age = time.time() - float(holder.get("heartbeat", 0))
        return f"pid {holder.get('pid')} on host {holder.get('host')} (heartbeat {age:.0f} s ago)"

    def _refuse(self, holder: dict | None):
        os.close(self._fd)
        self._fd = None
        who = self.describe(holder)
        raise JobLocked(
            f"job folder {self.folder} is being written by {who}: two copies of one job "
            f"would overwrite each other's checkpoints and record. Wait for it to finish (rerunning the same "
            f"command then returns its record), or stop it. If that process is gone (e.g. a crashed node), "
            f"delete {self.path} and rerun.",
            who,
        )

    # -- acquire / release ------------------------------------------------------------------
    def acquire(self) -> "JobLock":
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        flocked = True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            flocked = False
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self._refuse(self._read_holder())
            # ENOLCK / ENOSYS / EOPNOTSUPP: a filesystem without flock; the holder file decides
            log.warning(
                "flock unavailable on %s (%s); relying on the host/pid/heartbeat in the lock file", self.path, err
            )
        holder = self._read_holder()
        if holder and self._holder_alive(holder, flocked):
            self._refuse(holder)
        if holder and holder.get("pid") != self.info["pid"]:
            log.warning("taking over the stale lock of %s", self.describe(holder))
        self._write_holder()
        self._thread = threading.Thread(target=self._beat, name="pilora-lock-heartbeat", daemon=True)
        self._thread.start()
        _held[self.folder] = self
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_holder()
            except (OSError, TypeError):  # closed by release() meanwhile
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _held.pop(self.folder, None)
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)  # an empty lock file names no holder
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holds_lock(path: str) -> bool:
    """Whether this process holds the lock of the job folder containing ``path`` (or of ``path``)."""
    p = os.path.abspath(path)
    while True:
        if p in _held:
            return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


# -- manifest: what the folder was made for ----------------------------------------------------
# Inputs are identified by content (SHA-256), so that a `touch`, a fresh copy to node-local scratch
# or the same data under another task.dataset.root still resume, while an edit that keeps size and
# mtime does not. Digests are cached by path + inode + size + mtime + ctime: the ctime changes with
# every write (and cannot be set back by `touch -d` or `rsync -t`), so a cached digest is only
# reused for an unchanged file; hashing happens once per file version, not once per job.
HASH_CACHE = os.environ.get("PILORA_HASH_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pilora", "input-hashes.json"
)
_CHUNK = 1 << 20
_digests: dict[str, list] = {}  # path -> [stat key, digest]; this process's view of HASH_CACHE
_cache_loaded = False
_cache_dirty = False


def _stat_key(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_cache() -> None:
    global _cache_loaded
    if not _cache_loaded:
        _cache_loaded = True
        cached = _read_json(HASH_CACHE)
        if isinstance(cached, dict):
            for path, entry in cached.items():
                _digests.setdefault(path, entry)


def _save_cache() -> None:
    """Merge this process's digests into :data:`HASH_CACHE` (a cache: a failed write only costs a rehash)."""
    global _cache_dirty
    if not _cache_dirty:
        return
    _cache_dirty = False
    merged = _read_json(HASH_CACHE)
    merged = {**(merged if isinstance(merged, dict) else {}), **_digests}
    try:
        atomic_write_json(HASH_CACHE, merged, indent=0, fsync=False)
    except OSError as err:
        log.debug("could not write the input hash cache %s: %s", HASH_CACHE, err)


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, from the cache while the file is unchanged (see :data:`HASH_CACHE`)."""
    global _cache_dirty
    import hashlib

    path = os.path.abspath(path)
    key = _stat_key(os.stat(path))
    _load_cache()
    hit = _digests.get(path)
    if isinstance(hit, list) and len(hit) == 2 and hit[0] == key:
        return hit[1]
    if key[2] > 1 << 30:
        log.info("hashing %s (%.1f GB) to identify this job's inputs; cached afterwards", path, key[2] / 2**30)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    _digests[path] = [key, h.hexdigest()]
    _cache_dirty = True
    return h.hexdigest()


def _identity(path: str, out: str | None = None) -> dict:
    """What a job's input is: the SHA-256 of a file's bytes; for a folder, of the sorted relative
    paths and digests of every file under it (hidden files and folders, and the job folder
    ``out``, left out). The path is kept for the reader, never compared."""
    import hashlib

    if not os.path.isdir(path):
        return {"kind": "file", "sha256": file_digest(path)}
    h, files = hashlib.sha256(), 0
    for here, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(here, d) != out)
        for name in sorted(n for n in names if not n.startswith(".")):
            full = os.path.join(here, name)
            try:
                digest = file_digest(full)
            except OSError:  # vanished or unreadable: the job fails on it, if it uses it
                continue
            h.update(f"{os.path.relpath(full, path)}\0{digest}\n".encode())
            files += 1
    return {"kind": "dir", "files": files, "sha256": h.hexdigest()}


def _legacy_identity(path: str) -> dict:
    """The identity job folders made before content digests recorded: size + mtime of a file, of the
    top-level entries of a folder."""
    st = os.stat(path)
    if os.path.isdir(path):
        entries = {}
        for name in sorted(os.listdir(path))[:1000]:
            try:
                e = os.stat(os.path.join(path, name))
                entries[name] = [e.st_size, e.st_mtime_ns]
            except OSError:
                continue
        return {"dir": entries}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _path_values(cfg: dict, out: str):
    """``(dotted key, absolute path)`` of every path-like string of ``cfg`` naming an existing file or
    folder outside the job folder ``out``."""

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                if key == "" and k in NOT_RESULT_KEYS:
                    continue
                yield from walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and os.sep in node:
            path = os.path.abspath(os.path.expanduser(node))
            if path != out and not path.startswith(out + os.sep) and os.path.exists(path):
                yield key, path

    yield from walk(cfg, "")


def input_files(cfg: dict, out: str) -> dict:
    """Identity (:func:`_identity`) of every existing file / folder named by a path-like string of
    ``cfg`` (outside the job folder itself), keyed by its dotted config key."""
    out = os.path.abspath(out)
    found = {}
    for key, path in _path_values(cfg, out):
        try:
            found[key] = {"path": path, **_identity(path, out)}
        except OSError:
            pass
    _save_cache()
    return found


def _mask_inputs(cfg, keys: set[str]):
    """``cfg`` with the values at the dotted ``keys`` replaced by a marker: inputs compared by content."""
    if not keys:
        return cfg

    def walk(node, key):
        if key in keys:
            return "<input, compared by content>"
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(cfg, "")


def _input_differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key), new.get(key)
        if was is None or now is None:
            out.append(f"input.{key} (new: {now['path']!r})" if was is None else f"input.{key} (was {was}, now unset)")
        elif isinstance(was, dict) and "sha256" in was:
            if (was.get("kind"), was["sha256"]) != (now.get("kind"), now.get("sha256")):
                out.append(
                    f"input.{key} content (was {was.get('kind')} {was.get('path')!r} sha256 {str(was['sha256'])[:12]}, "
                    f"now {now.get('kind')} {now.get('path')!r} sha256 {str(now.get('sha256'))[:12]})"
                )
        else:  # a manifest from before content digests: compared as it was made
            try:
                current = {"path": now["path"], **_legacy_identity(now["path"])}
            except OSError:
                current = {"path": now["path"]}
            out += _differences(was, current, f"input.{key}")
    return out


def manifest(cfg: dict, out: str) -> dict:
    """What makes the folder this job's: the config and inputs that decide the trained weights. The
    task's evaluation-only settings are left out (a change reruns only the evaluation, see
    :mod:`pilora.runner.evaluate`); the record names them in ``evaluation.settings``."""
    from .evaluate import without_evaluation

    cfg = without_evaluation(cfg)
    return {"config": {k: v for k, v in cfg.items() if k not in NOT_RESULT_KEYS}, "inputs": input_files(cfg, out)}


def _normalise(obj):
    return json.loads(json.dumps(obj, default=str))


def _differences(old, new, key="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in old:
                out.append(f"{sub} (new: {new[k]!r})")
            elif k not in new:
                out.append(f"{sub} (was {old[k]!r}, now unset)")
            else:
                out += _differences(old[k], new[k], sub)
        return out
    return [] if old == new else [f"{key} (was {old!r}, now {new!r})"]


def _manifest_differences(theirs: dict, mine: dict) -> list[str]:
    from .evaluate import is_evaluation_key, without_evaluation

    old_cfg = theirs.get("config")
    if isinstance(old_cfg, dict):  # a manifest written when evaluation settings were part of it
        old_cfg = without_evaluation(old_cfg)
    if isinstance(old_cfg, dict) and isinstance(old_cfg.get("method"), dict):
        # a folder made before the method section held only the keys its method uses
        from ..methods import recorded_section

        old_cfg = {**old_cfg, "method": recorded_section(old_cfg["method"])}
    old_inputs = theirs.get("inputs") if isinstance(theirs.get("inputs"), dict) else {}
    old_inputs = {k: v for k, v in old_inputs.items() if not is_evaluation_key(mine["config"], k)}
    # a path both manifests identified by content is compared by content, not by where it lies
    by_content = {k for k in set(old_inputs) & set(mine["inputs"]) if "sha256" in (old_inputs[k] or {})}
    return _differences(_mask_inputs(old_cfg, by_content), _mask_inputs(mine["config"], by_content), "config") + (
        _input_differences(old_inputs, mine["inputs"])
    )


def is_twin(cfg: dict, out: str, wait_s: float = 10.0) -> bool:
    """Whether the job that holds ``out`` was made with this very config and these input files (its
    ``job.json`` equals this job's manifest). A holder writes its manifest right after taking the
    lock, so a missing one is waited for up to ``wait_s`` seconds."""
    path = os.path.join(out, MANIFEST)
    deadline = time.time() + wait_s
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.2)
    theirs = _read_json(path)
    return isinstance(theirs, dict) and not _manifest_differences(theirs, _normalise(manifest(cfg, out)))


def check_reusable(cfg: dict, out: str) -> None:
    """Raise :class:`StaleJob` when ``out`` holds a job (record, checkpoints or statistics) that was
    not made with this config and these input files; write the manifest for a new job."""
    mine = _normalise(manifest(cfg, out))
    path = os.path.join(out, MANIFEST)
    theirs = None
    try:
        with open(path) as f:
            theirs = json.load(f)
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        theirs = {"config": "<unreadable job.json>"}
    if theirs is None:
        existing = [a for a in JOB_ARTIFACTS if os.path.exists(os.path.join(out, a))]
        if existing:  # a folder written before manifests existed, or by a different tool
            record = _read_json(os.path.join(out, "results.json"))
            if record and isinstance(record.get("config"), dict):
                old_cfg = {k: v for k, v in record["config"].items() if k not in NOT_RESULT_KEYS}
                theirs = {"config": old_cfg, "inputs": mine["inputs"]}  # no input identities were kept
            else:
                theirs = {"config": f"<no {MANIFEST}; holds {', '.join(existing)}>"}
    if theirs is not None:
        diff = _manifest_differences(theirs, mine)
        produced = [a for a in JOB_ARTIFACTS if a != MANIFEST and os.path.lexists(os.path.join(out, a))]
        if diff and not produced:  # a job refused before its first step (bad input) left its manifest only
            log.info("%s: the earlier job here wrote nothing but its manifest; this job takes the folder", out)
            diff = []
            os.remove(path)
        if diff:
            shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} differences)" if len(diff) > 6 else "")
            raise StaleJob(
                f"the job folder {out} holds a run of a different config or input files: {shown}. "
                "Its record and checkpoints would not belong to this run. Rerun into a new folder "
                "(hydra.run.dir=... / sweep_name=...), or with resume=false to discard that run and start clean."
            )
        if os.path.exists(path):
            return
    # temp file + rename, without fsync: a full disk is reported by the record write at the end
    # (RecordWriteError); a power loss at worst leaves an unreadable manifest, which the rerun reports
    atomic_write_json(path, mine, indent=1, fsync=False)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def start_clean(out: str) -> list[str]:
    """``resume=false``: remove what an earlier run of this job wrote (stage 1 included)."""
    removed = []
    for name in JOB_ARTIFACTS:
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)
        else:
            continue
        removed.append(name)
    if removed:
        log.info("resume=false: removed %s from %s", ", ".join(removed), out)
    return removed


class _NoLock:
    def release(self) -> None:
        pass


class Twin(_NoLock):
    """What :func:`open_job` returns, with ``twins=True``, when a live job of this very config holds
    the folder: a sweep point that repeats another (e.g. ``-m method=lora,pilora
    method.supplementary_r=1,2`` makes two identical LoRA jobs, one folder) run by a parallel
    launcher. The other job writes the folder and its record; this one has nothing to do."""

    def __init__(self, folder: str, holder: str):
        self.folder, self.holder = folder, holder


def open_job(cfg: dict, twins: bool = False):
    """Take the job folder for this process: the lock (rank 0 only: the other ranks of a DDP job
    never remove or write job files) and the manifest check; ``resume=false`` cleans later
    (:func:`take_clean`, once the inputs passed). Returns an object whose ``release()`` frees the folder.

    A live holder stops this job with :class:`JobLocked`, unless ``twins`` (a sweep: ``run.py -m``)
    and the holder runs this very config in one process: then a :class:`Twin` is returned and
    this job has nothing to do (under DDP the ranks could not agree on that, so it stays an error)."""
    from ..distributed import is_main, world_size
    from .checks import check_values

    check_values(cfg)  # before the folder exists: a bad value leaves nothing behind
    out = os.path.abspath(cfg["output_dir"])
    os.makedirs(out, exist_ok=True)
    if not is_main():
        return _NoLock()
    try:
        lock = JobLock(out).acquire()
    except JobLocked as err:
        if twins and world_size() == 1 and is_twin(cfg, out):
            return Twin(out, err.holder)
        raise err
    try:
        # resume=false cleans only once the job's inputs have passed (pilora.runner.train: take_clean):
        # a typo must not delete a finished run
        if cfg.get("resume", True):
            check_reusable(cfg, out)
    except BaseException:
        lock.release()
        raise
    return lock


def take_clean(cfg: dict, out: str) -> None:
    """``resume=false``, once the job's inputs have been checked: remove the earlier run and write
    this job's manifest (rank 0)."""
    start_clean(out)
    check_reusable(cfg, out)
