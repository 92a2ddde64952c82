"""Adapter folders that stock tools load.

Every job writes ``<run>/adapter/``: a plain PEFT LoRA that ``peft.PeftModel.from_pretrained`` and
``lm_eval --model hf --model_args pretrained=<base>,peft=<run>/adapter`` load with no PiLoRA code.
For PiLoRA that is the exact rank ``r + r'`` export of the trained update (Sec. 3.3: the update
``s_d·(M ⊗ B_d) A_d + s_s·(M̄ ⊗ B_s) A_s`` equals one LoRA with ``A = [A_d; A_s]`` and
``B = s_d·[M ⊗ B_d, c·M̄ ⊗ B_s]``, scaling 1); the compact form (``B_d``, ``B_s``, masks) that
:func:`pilora.load_adapter` rebuilds for further training lives beside it in
``<run>/adapter_pilora/``.

Runs written before this layout kept the compact PiLoRA form in ``adapter/``, which stock PEFT
cannot load (its config says ``r`` but the weights hold ``r + r'`` rows and masks). Convert them
in place, with no model and no download (the export is computed from the saved tensors)::

    python -m pilora.export multirun/table1_llama2/method=pilora     # one run, or a tree of runs

PiSSA and MiLoRA move part of ``W0`` into the adapter at init (``W0 → W_res = W0 − s·B₀A₀``).
Their trained ``(A, B)`` only reproduce the trained model on top of ``W_res``, which is not saved;
loaded onto the pretrained ``W0`` they would be wrong. PEFT converts such an adapter to a plain
LoRA on ``W0`` (``ΔW = s·(B A − B₀ A₀)``, rank ``2r``) from the adapter as it was at init
(``save_pretrained(..., path_initial_model_for_weight_conversion=...)``), so the init is saved
right after it is made (:func:`save_initial_adapter`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import torch

from .layer import PILORA_FILE, pilora_masks, save_adapter

ADAPTER_DIR = "adapter"  # stock PEFT LoRA (every method)
PILORA_ADAPTER_DIR = "adapter_pilora"  # PiLoRA's compact form, for pilora.load_adapter
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_B_PARTS = (".lora_B.dominant", ".lora_B.supplementary", ".lora_B.dominant_mask")
INITIAL_ADAPTER_DIR = "adapter_init"  # PiSSA / MiLoRA: the adapter as initialised, for the conversion
_INITIAL_ATTR = "_pilora_initial_adapter"


class ExportError(ValueError):
    """An adapter folder that cannot be exported (the message says why and what to do)."""


def is_pilora_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PILORA_FILE))


def dedupe_modules_to_save(path: str) -> None:
    """Rewrite ``adapter_config.json`` with each ``modules_to_save`` entry once.

    PEFT's sequence-classification wrapper appends its head names (``classifier``, ``score``) to
    the list it is given, so a saved config lists ``classifier`` twice, and every reload appends
    them again."""
    file = os.path.join(path, CONFIG)
    with open(file) as f:
        cfg = json.load(f)
    mods = cfg.get("modules_to_save")
    if isinstance(mods, list) and len(set(mods)) != len(mods):
        cfg["modules_to_save"] = list(dict.fromkeys(mods))
        with open(file, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)


def export_compact(src: str, dst: str) -> dict:
    """Compact PiLoRA folder ``src`` -> stock PEFT LoRA folder ``dst`` (rank ``r + r'``, scaling 1).

    Computed from the saved tensors alone. Returns ``{"rank": r + r', "modules": n}``."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    if not is_pilora_adapter(src):
        raise ExportError(
            f"{src!r} holds no {PILORA_FILE}: it is not a compact PiLoRA adapter "
            "(a plain LoRA folder needs no export; peft.PeftModel.from_pretrained loads it)"
        )
    with open(os.path.join(src, PILORA_FILE)) as f:
        pcfg = json.load(f)
    cfg = LoraConfig.from_pretrained(src)
    if cfg.use_dora or cfg.alpha_pattern or cfg.rank_pattern:
        raise ExportError(
            f"{src}: DoRA or per-module rank/alpha patterns are not part of a PiLoRA adapter; "
            "this folder was not written by pilora.save_adapter"
        )
    state = load_file(os.path.join(src, WEIGHTS))
    c = float(pcfg.get("supplementary_scale", 1.0))
    out, rank, n = {}, None, 0
    for key in sorted(state):
        if not key.endswith(".lora_B.dominant_mask"):
            continue
        prefix = key[: -len(".lora_B.dominant_mask")]
        mask = state[key].bool()
        B_d, B_s = state[prefix + ".lora_B.dominant"], state[prefix + ".lora_B.supplementary"]
        A = state[prefix + ".lora_A.weight"]
        r = B_d.shape[1]
        # PEFT's scaling of the layer: lora_alpha / r (rsLoRA: / sqrt(r)); r is the dominant rank
        s = cfg.lora_alpha / (math.sqrt(r) if cfg.use_rslora else r)
        B = torch.zeros(mask.numel(), A.shape[0], dtype=torch.float32)
        B[mask, :r] = B_d.float()
        B[~mask, r:] = B_s.float() * c
        if rank is not None and A.shape[0] != rank:
            raise ExportError(
                f"{src}: layers have different ranks r + r' ({rank} and {A.shape[0]}); "
                "one PEFT LoRA config cannot hold them"
            )
        rank = A.shape[0]
        out[prefix + ".lora_A.weight"] = A.contiguous()
        out[prefix + ".lora_B.weight"] = (B * s).to(A.dtype).contiguous()
        n += 1
    if not n:
        raise ExportError(f"{src}/{WEIGHTS} holds no PiLoRA layers (no *.lora_B.dominant_mask tensors)")
    # everything else PEFT saved (heads trained in full, trained biases) travels as it is
    for key, value in state.items():
        if not (key.endswith(_B_PARTS) or key.endswith(".lora_A.weight")):
            out[key] = value.contiguous()
    stock = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=cfg.target_modules,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.bias,
        modules_to_save=list(dict.fromkeys(cfg.modules_to_save or [])) or None,
        task_type=cfg.task_type,
        base_model_name_or_path=cfg.base_model_name_or_path,
        layers_to_transform=cfg.layers_to_transform,
        layers_pattern=cfg.layers_pattern,
    )
    os.makedirs(dst, exist_ok=True)
    stock.save_pretrained(dst)
    save_file(out, os.path.join(dst, WEIGHTS), metadata={"format": "pt"})
    return {"rank": rank, "modules": n}


def export_lora(peft_model, path: str, adapter_name: str = "default") -> None:
    """Write a plain PEFT LoRA of rank ``r + r'`` whose update equals the in-memory PiLoRA model's.

    ``A = [A_d; A_s]``, ``B = s·[M ⊗ B_d, c·M̄ ⊗ B_s]`` and ``lora_alpha = r + r'`` (scaling 1), so
    stock ``peft.PeftModel.from_pretrained`` loads it with no PiLoRA code. The model's compact form
    is saved and exported by :func:`export_compact`: one piece of code writes every export."""
    import tempfile

    with tempfile.TemporaryDirectory() as compact:
        save_adapter(peft_model, compact, adapter_name)
        export_compact(compact, path)


def save_initial_adapter(peft_model, path: str) -> str:
    """Save the adapter as initialised (call before training); later saves of this model are
    converted against it. Returns ``path``. Only meaningful for inits that mutate ``W0``."""
    peft_model.save_pretrained(path)
    setattr(peft_model, _INITIAL_ATTR, os.path.abspath(path))
    return path


def save_peft_adapter(peft_model, path: str) -> None:
    """Write ``path`` so that ``PeftModel.from_pretrained(<pretrained model>, path)`` reproduces
    ``peft_model``'s outputs: the PiLoRA export, the PiSSA/MiLoRA conversion, or PEFT's own save."""
    if pilora_masks(peft_model):
        export_lora(peft_model, path)
        return
    initial = getattr(peft_model, _INITIAL_ATTR, None)
    if initial is not None:
        if not os.path.isdir(initial):
            raise FileNotFoundError(
                f"the initial adapter {initial!r} this model's conversion needs is gone; "
                "it is written when training starts (rerun with resume=false)"
            )
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        peft_model.save_pretrained(path, path_initial_model_for_weight_conversion=initial)
        # PEFT's conversion keeps only the LoRA tensors: put back what is trained in full
        # (modules_to_save, e.g. a classification head), or the reload would start a fresh head
        full = {
            k: v.detach().contiguous().cpu()
            for k, v in get_peft_model_state_dict(peft_model).items()
            if ".lora_" not in k
        }
        if full:
            file = os.path.join(path, "adapter_model.safetensors")
            save_file({**load_file(file), **full}, file, metadata={"format": "pt"})
        return
    peft_model.save_pretrained(path)


def write_adapters(peft_model, run_dir: str) -> str:
    """Save a trained model's adapter into ``run_dir``; returns the stock-loadable folder.

    PiLoRA: the compact form to ``adapter_pilora/`` and its rank ``r + r'`` export to ``adapter/``.
    Every other method: PEFT's own ``save_pretrained`` into ``adapter/`` (PiSSA / MiLoRA converted to
    a LoRA on the pretrained weights, :func:`save_peft_adapter`)."""
    stock = os.path.join(run_dir, ADAPTER_DIR)
    if pilora_masks(peft_model):
        compact = os.path.join(run_dir, PILORA_ADAPTER_DIR)
        save_adapter(peft_model, compact)
        dedupe_modules_to_save(compact)
        export_compact(compact, stock)
    else:
        save_peft_adapter(peft_model, stock)
        dedupe_modules_to_save(stock)
    return stock


def export_run(run_dir: str) -> str | None:
    """Bring one run folder to the current layout; returns what was done (None: nothing to do).

    An ``adapter/`` holding the compact PiLoRA form is moved to ``adapter_pilora/`` and replaced by
    its stock export. The export is written to a temporary folder first, so an interrupted
    conversion leaves the compact adapter intact (rerun the command to finish it)."""
    stock, compact = os.path.join(run_dir, ADAPTER_DIR), os.path.join(run_dir, PILORA_ADAPTER_DIR)
    if os.path.isdir(stock) and is_pilora_adapter(stock):
        if os.path.exists(compact):
            raise ExportError(
                f"{run_dir} has both a compact PiLoRA adapter/ and {PILORA_ADAPTER_DIR}/; "
                f"remove the one you do not want and rerun"
            )
        tmp = stock + ".export-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        info = export_compact(stock, tmp)
        os.replace(stock, compact)
        os.replace(tmp, stock)
        return f"exported rank {info['rank']} LoRA ({info['modules']} modules) to {stock}; compact form in {compact}"
    if os.path.isdir(compact) and not os.path.isfile(os.path.join(stock, WEIGHTS)):
        info = export_compact(compact, stock)  # a conversion interrupted between its two renames
        return f"exported rank {info['rank']} LoRA ({info['modules']} modules) to {stock}"
    if os.path.isfile(os.path.join(stock, CONFIG)):
        dedupe_modules_to_save(stock)
    return None


def _run_dirs(root: str) -> list[str]:
    found = []
    for here, dirs, _ in os.walk(root):
        if ADAPTER_DIR in dirs or PILORA_ADAPTER_DIR in dirs:
            found.append(here)
        dirs[:] = [
            d
            for d in dirs
            if d not in (ADAPTER_DIR, PILORA_ADAPTER_DIR, "wandb", ".hydra") and not d.startswith("checkpoint-")
        ]
    return sorted(found)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Write the stock-PEFT adapter/ of older runs (PiLoRA: rank r + r' "
        "export; the compact form moves to adapter_pilora/)."
    )
    p.add_argument("run_dirs", nargs="+", help="run folders, or folders to search for runs")
    args = p.parse_args(argv)
    status = 0
    for root in args.run_dirs:
        if not os.path.isdir(root):
            print(f"error: {root}: no such folder", file=sys.stderr)
            status = 1
            continue
        runs = _run_dirs(root)
        if not runs:
            print(
                f"error: {root}: no run folder with an {ADAPTER_DIR}/ below it (was it run with save_adapter=false?)",
                file=sys.stderr,
            )
            status = 1
        for run in runs:
            try:
                done = export_run(run)
            except (ExportError, OSError, KeyError) as err:
                print(f"error: {run}: {err}", file=sys.stderr)
                status = 1
                continue
            print(f"{run}: {done or 'already in the current layout'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
