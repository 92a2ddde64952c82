"""Which errors a user can fix (one message naming the problem, the file and the fix, no
traceback) and which are bugs (the traceback is what a bug report needs).

Expected are the project's own error types, the ``ValueError`` / ``FileNotFoundError`` that the
project raises on purpose (a ``raise`` statement in ``pilora``, so the message was written for the
user; one raised inside torch or transformers, or by a builtin such as ``float('abc')`` called from
``pilora``, is not), and the operating system's refusals to write (disk full, quota, read-only
filesystem, permissions), wherever they surface."""

from __future__ import annotations

import dis
import errno
import os

from ..distributed import DistributedMismatch
from ..io import RecordWriteError
from ..tasks import DataError
from .callbacks import TrainingDiverged
from .checkpoints import CorruptCheckpoint, ResumeError
from .jobdir import JobLocked, StaleJob
from .validate import ConfigError

EXPECTED = (
    ConfigError,
    DataError,
    StaleJob,
    JobLocked,
    CorruptCheckpoint,
    ResumeError,
    RecordWriteError,
    DistributedMismatch,
    TrainingDiverged,
)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# what torch.save reports when the disk fills (a RuntimeError, not an OSError)
_TORCH_WRITE_FAILED = ("file write failed", "No space left on device", "unexpected pos")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _raised_by_us(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` statement of ``pilora``: the innermost traceback entry
    is a ``pilora`` frame, and the instruction it failed at is ``RAISE_VARARGS``.

    The frame alone is not enough: a builtin (``float('abc')``, ``str.format``, ``int()``) has no
    Python frame, so its ValueError ends in the ``pilora`` frame that called it, with a message
    ("could not convert string to float: 'abc'") that names no key. Its failing instruction is the
    call, not a raise. The instruction, unlike the source line, is exact: a raise whose message
    formatting fails (``raise ValueError(f"{x:d}")``) fails at the formatting, and a caught builtin
    error re-raised (``except ValueError: raise`` / ``raise err``) keeps its innermost entry at
    the call."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    code = last.tb_frame.f_code
    if not os.path.abspath(code.co_filename).startswith(_PACKAGE + os.sep):
        return False
    failed_at = next((i.opname for i in dis.get_instructions(code) if i.offset == last.tb_lasti), None)
    return failed_at == "RAISE_VARARGS"


def _os_message(err: OSError, where: str | None) -> str | None:
    name = err.filename or where or "the job folder"
    if err.errno in _DISK_FULL:
        return (
            f"no space left on the device writing {name!r} ({os.strerror(err.errno)}). Free some space (or raise "
            "the quota), or put the job on another disk (hydra.run.dir=... / output_dir=...), and rerun the "
            "same command: it resumes from the last checkpoint"
        )
    if err.errno in _NOT_WRITABLE:
        return (
            f"cannot write {name!r}: {os.strerror(err.errno)}. Make the folder writable (chmod / a writable "
            "mount), or put the job elsewhere with hydra.run.dir=... (output_dir=...)"
        )
    return None


def expected_message(err: BaseException, output_dir: str | None = None) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug."""
    for e in _chain(err):
        if isinstance(e, OSError) and (msg := _os_message(e, output_dir)):
            return msg
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILED):
            return _os_message(OSError(errno.ENOSPC, "", output_dir), output_dir) + f" (torch: {e})"
    if isinstance(err, EXPECTED):
        return str(err)
    if type(err) in (ValueError, FileNotFoundError) and _raised_by_us(err):
        return str(err)
    return None


def exit_on_expected(fn, *args, output_dir: str | None = None, on_error=None, **kwargs):
    """``fn(*args, **kwargs)``; an expected error ends the process with ``error: <message>`` on stderr
    and exit status 1 instead of a traceback (a bug raises). ``on_error(message)``, when given, is
    called instead, for a bug too once its traceback is logged, and its value returned (a sweep
    point's error ends that point, not the sweep, which still ends with its table:
    ``hydra_setup.FailedPoint``)."""
    import logging
    import sys

    log = logging.getLogger("pilora")
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - classified here, re-raised when it is a bug
        message = expected_message(err, output_dir)
        if message is None:
            if on_error is None:
                raise
            log.error("a bug ended this job (not a setting to fix):", exc_info=True)  # console and the job's log
            return on_error(f"{type(err).__name__}: {err} (a bug: its traceback is in the job's log)")
        log.debug("expected error", exc_info=True)  # the traceback stays in run.log
        if on_error is not None:
            log.error("%s", message)
            return on_error(message)
        sys.exit(f"error: {message}")
