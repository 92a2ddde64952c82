"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

Used by the method's own artifacts (``importance.pt``) and by the runner's records alike."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import IO, Callable


class RecordWriteError(OSError):
    """The record could not be written (disk full, quota, permissions ...); the previous file, if
    any, is untouched and no partial file is left behind."""


def atomic_write(path, write: Callable[[IO], None], *, binary: bool = False, fsync: bool = True) -> None:
    """Write a file so that readers see either the old file or the complete new one.

    ``write(f)`` fills a temporary file in the same folder (permissions from the umask, not
    mkstemp's 0600, so a group on a shared disk can read results); it is fsynced (unless
    ``fsync=False``) and renamed over ``path`` (atomic on POSIX). On any failure the temporary
    file is removed and the error propagates.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj, *, indent: int = 2, fsync: bool = True) -> None:
    """:func:`atomic_write` of ``obj`` as JSON. An ``OSError`` (e.g. ENOSPC) becomes a
    :class:`RecordWriteError` that names the file and the cause."""
    path = os.path.abspath(os.fspath(path))
    try:
        atomic_write(path, lambda f: json.dump(obj, f, indent=indent, default=_jsonable, allow_nan=True), fsync=fsync)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        hint = " Free some disk space and rerun the command." if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise RecordWriteError(
            err.errno,
            f"could not write the record {path!r}: {reason} ({err}); "
            f"{'the previous record is unchanged' if os.path.exists(path) else 'no record was written'}."
            f"{hint}",
        ) from err


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the process umask leaves it (what ``open(..., "w")`` would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def follow_umask(folder) -> None:
    """Give the files directly in ``folder`` the mode the umask leaves (:func:`umask_mode`).
    safetensors writes its files 0600 whatever the umask, so an adapter or checkpoint saved
    through PEFT would be unreadable to the rest of a group sharing the disk."""
    mode = umask_mode()
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and entry.stat().st_mode & 0o777 != mode:
            os.chmod(entry.path, mode)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
