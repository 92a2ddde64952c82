"""Adapter folders that stock tools load.

A PiLoRA model saves (``save_pretrained``, ``transformers.Trainer.save_model``, every checkpoint,
:func:`pilora.save_adapter`) a folder that both stock PEFT and :func:`pilora.load_adapter` read,
and in which no file claims a type it is not (:class:`pilora.layer.PiLoRASaving`):

* ``adapter_config.json`` + ``adapter_model.safetensors``: the exact rank ``r + r'`` LoRA export of
  the update (Sec. 3.3: ``s_d·(M ⊗ B_d) A_d + s_s·(M̄ ⊗ B_s) A_s`` equals one LoRA with
  ``A = [A_d; A_s]`` and ``B = s_d·[M ⊗ B_d, c·M̄ ⊗ B_s]``, scaling 1), for
  ``peft.PeftModel.from_pretrained`` and ``lm_eval --model hf --model_args peft=...``;
* ``pilora_config.json`` (``"peft_type": "PILORA"``, the rank ``r`` LoRA settings and ``r'``) and
  ``pilora_model.safetensors`` (``B_d``, ``B_s``, masks): the compact form, rebuilt exactly.

Every job writes ``<run>/adapter/`` (stock PEFT for every method; for PiLoRA the export alone) and,
for PiLoRA, ``<run>/adapter_pilora/`` (the folder above, for further training).

Older layouts are converted in place, with no model and no download (from the saved tensors)::

    python -m pilora.export multirun/table1_llama2/method=pilora     # one run, or a tree of runs

They are: the compact form in ``adapter/`` (its config said LoRA of rank ``r`` over ``r + r'`` rows
and masks, which stock PEFT fails to load), and ``adapter_pilora/`` holding that compact form beside
a stock ``adapter/``. :func:`pilora.load_adapter` also reads the compact form as it is.

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

from .io import follow_umask
from .layer import PILORA_FILE, PILORA_WEIGHTS, pilora_masks, save_adapter

ADAPTER_DIR = "adapter"  # stock PEFT LoRA (every method)
PILORA_ADAPTER_DIR = "adapter_pilora"  # PiLoRA's folder: the stock export plus the compact form
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PILORA_TYPE = "PILORA"  # the peft_type pilora_config.json declares
PILORA_SETTINGS = ("supplementary_r", "supplementary_alpha", "supplementary_scale")
_B_PARTS = (".lora_B.dominant", ".lora_B.supplementary", ".lora_B.dominant_mask")
INITIAL_ADAPTER_DIR = "adapter_init"  # PiSSA / MiLoRA: the adapter as initialised, for the conversion
_INITIAL_ATTR = "_pilora_initial_adapter"


class ExportError(ValueError):
    """An adapter folder that cannot be exported (the message says why and what to do)."""


def layout(path: str) -> str | None:
    """What an adapter folder holds: ``"pilora"`` (stock export + compact form), ``"compact"`` (the
    older compact-only form), ``"lora"`` (a PEFT adapter with no PiLoRA files) or None."""
    file = os.path.join(path, PILORA_FILE)
    if os.path.isfile(file):
        with open(file) as f:
            return "pilora" if json.load(f).get("peft_type") == PILORA_TYPE else "compact"
    return "lora" if os.path.isfile(os.path.join(path, CONFIG)) else None


def is_pilora_adapter(path: str) -> bool:
    return layout(path) in ("pilora", "compact")


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
        _write_json(file, cfg)


def _write_json(file: str, data: dict) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, file)


def _save_tensors(state: dict, file: str) -> None:
    from safetensors.torch import save_file

    tmp = file + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, file)


def _lora_config(fields: dict, where: str):
    """The rank ``r`` ``LoraConfig`` a PiLoRA adapter was built from (PEFT's forward-compatible
    construction: keys a newer PEFT wrote and this one lacks are dropped with its warning)."""
    from peft import LoraConfig

    kwargs = {k: v for k, v in fields.items() if k not in (*PILORA_SETTINGS, "peft_type", "format", "files")}
    try:
        return LoraConfig.from_peft_type(**kwargs)
    except (TypeError, ValueError) as err:
        raise ExportError(f"{where}: not a PiLoRA config PEFT can read ({err})") from err


def read_pilora_folder(path: str):
    """``(rank-r LoraConfig, {supplementary_r, supplementary_alpha, supplementary_scale}, compact
    state)`` of a PiLoRA folder in either layout; the state is what PEFT's state dict of the
    compact model holds (``A``, ``B_d``, ``B_s``, masks, fully trained modules)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    kind = layout(path)
    if kind not in ("pilora", "compact"):
        raise FileNotFoundError(
            f"{os.path.join(path, PILORA_FILE)} not found: {path!r} is not a PiLoRA adapter directory "
            "(a plain LoRA loads with peft.PeftModel.from_pretrained)"
        )
    with open(os.path.join(path, PILORA_FILE)) as f:
        pfile = json.load(f)
    missing = [k for k in ("supplementary_r", "supplementary_alpha") if k not in pfile]
    if missing:
        raise ExportError(f"{path}/{PILORA_FILE} lacks {missing}; it was not written by pilora")
    pcfg = {k: pfile.get(k) for k in PILORA_SETTINGS}
    pcfg["supplementary_scale"] = float(pcfg["supplementary_scale"] if pcfg["supplementary_scale"] is not None else 1.0)
    state = load_file(os.path.join(path, WEIGHTS))
    if kind == "compact":
        return LoraConfig.from_pretrained(path), pcfg, state
    extra = load_file(os.path.join(path, PILORA_WEIGHTS))
    # A and the fully trained modules are stored as they are in the stock file; its B is the export
    state = {k: v for k, v in state.items() if not k.endswith(".lora_B.weight")}
    state.update(extra)
    return _lora_config(pfile, path), pcfg, state


def _export_state(state: dict, cfg, c: float, where: str) -> tuple[dict, int, int]:
    """Compact PiLoRA tensors -> the tensors of a rank ``r + r'`` stock LoRA (scaling 1)."""
    if cfg.use_dora or cfg.alpha_pattern or cfg.rank_pattern:
        raise ExportError(
            f"{where}: DoRA or per-module rank/alpha patterns are not part of a PiLoRA adapter; "
            "this folder was not written by pilora"
        )
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
                f"{where}: layers have different ranks r + r' ({rank} and {A.shape[0]}); "
                "one PEFT LoRA config cannot hold them"
            )
        rank = A.shape[0]
        out[prefix + ".lora_A.weight"] = A.contiguous()
        out[prefix + ".lora_B.weight"] = (B * s).to(A.dtype).contiguous()
        n += 1
    if not n:
        raise ExportError(f"{where} holds no PiLoRA layers (no *.lora_B.dominant_mask tensors)")
    # everything else PEFT saved (heads trained in full, trained biases) travels as it is
    for key, value in state.items():
        if not (key.endswith(_B_PARTS) or key.endswith(".lora_A.weight")):
            out[key] = value.contiguous()
    return out, rank, n


def _write_stock(cfg, out: dict, rank: int, dst: str) -> None:
    from peft import LoraConfig

    stock = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=cfg.target_modules,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.bias,
        modules_to_save=list(dict.fromkeys(cfg.modules_to_save or [])) or None,
        task_type=cfg.task_type,
        base_model_name_or_path=cfg.base_model_name_or_path,
        revision=cfg.revision,
        layers_to_transform=cfg.layers_to_transform,
        layers_pattern=cfg.layers_pattern,
    )
    os.makedirs(dst, exist_ok=True)
    # the config first: a folder cut short between the two still holds compact weights, which
    # export_run recognises and finishes
    stock.save_pretrained(dst)
    _save_tensors(out, os.path.join(dst, WEIGHTS))


def export_compact(src: str, dst: str) -> dict:
    """PiLoRA folder ``src`` (either layout) -> stock PEFT LoRA folder ``dst`` (rank ``r + r'``,
    scaling 1), computed from the saved tensors alone. Returns ``{"rank": r + r', "modules": n}``."""
    if not is_pilora_adapter(src):
        raise ExportError(
            f"{src!r} holds no {PILORA_FILE}: it is not a compact PiLoRA adapter "
            "(a plain LoRA folder needs no export; peft.PeftModel.from_pretrained loads it)"
        )
    cfg, pcfg, state = read_pilora_folder(src)
    out, rank, n = _export_state(state, cfg, pcfg["supplementary_scale"], src)
    _write_stock(cfg, out, rank, dst)
    return {"rank": rank, "modules": n}


def finish_pilora_folder(path: str, settings: dict | None = None) -> dict:
    """Turn a folder holding the compact form (PEFT's save of a PiLoRA model: a rank ``r`` LoRA
    config over compact tensors, ``settings`` = the model's ``pilora_config``; or an older compact
    folder, whose ``pilora_config.json`` has them) into the two-part layout, in place.

    Written in an order that an interruption cannot lose: the compact ``B`` parts, then
    ``pilora_config.json`` (from then on the folder reads as the new layout, ``A`` still in the old
    weights file), then the stock config and weights. Rerunning finishes a cut-short conversion."""
    from safetensors.torch import load_file

    if layout(path) == "pilora":  # a conversion cut short: pilora_config.json is already the record
        with open(os.path.join(path, PILORA_FILE)) as f:
            fields = json.load(f)
        cfg, settings, state = read_pilora_folder(path)
    else:
        with open(os.path.join(path, CONFIG)) as f:
            fields = json.load(f)
        if settings is None:
            with open(os.path.join(path, PILORA_FILE)) as f:
                settings = json.load(f)
        cfg, state = _lora_config(fields, path), load_file(os.path.join(path, WEIGHTS))
    settings = {k: settings.get(k) for k in PILORA_SETTINGS}
    settings["supplementary_scale"] = float(settings["supplementary_scale"] or 1.0)
    out, rank, n = _export_state(state, cfg, settings["supplementary_scale"], path)
    _save_tensors({k: v for k, v in state.items() if k.endswith(_B_PARTS)}, os.path.join(path, PILORA_WEIGHTS))
    if isinstance(fields.get("modules_to_save"), list):
        fields["modules_to_save"] = list(dict.fromkeys(fields["modules_to_save"]))
    fields.update(settings, peft_type=PILORA_TYPE)
    fields["files"] = {
        "compact": f"{PILORA_WEIGHTS} (B_d, B_s, masks; A and trained modules as in {WEIGHTS})",
        "stock_export": f"{CONFIG} + {WEIGHTS}: a LoRA of rank r + r' = {rank}, scaling 1",
    }
    _write_json(os.path.join(path, PILORA_FILE), fields)
    _write_stock(cfg, out, rank, path)
    return {"rank": rank, "modules": n}


def _stock_is_compact(path: str) -> bool:
    """Whether ``adapter_model.safetensors`` still holds compact tensors (a cut-short conversion)."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, WEIGHTS), "pt") as f:
        return any(k.endswith(".lora_B.dominant_mask") for k in f.keys())


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


def carry_initial_adapter(source, copy) -> None:
    """Let ``copy`` (e.g. the all-gathered copy of an FSDP-trained model) save as ``source`` does:
    converted against ``source``'s initial adapter, when it has one."""
    initial = getattr(source, _INITIAL_ATTR, None)
    if initial is not None:
        setattr(copy, _INITIAL_ATTR, initial)


def save_peft_adapter(peft_model, path: str) -> None:
    """Write ``path`` so that ``PeftModel.from_pretrained(<pretrained model>, path)`` reproduces
    ``peft_model``'s outputs: the PiLoRA export, LoRA-Dash's rank-(r + s) export (PEFT's own save
    would reload without the dash term: it keeps A and B only), the PiSSA/MiLoRA conversion, or
    PEFT's own save."""
    from .methods.lora_dash import dash_layers, export_as_lora

    if pilora_masks(peft_model):
        export_lora(peft_model, path)
        return
    if dash_layers(peft_model):
        export_as_lora(peft_model, path)
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

    PiLoRA: ``adapter_pilora/`` (the model's ``save_pretrained``: stock export + compact form) and
    its stock export in ``adapter/``. Every other method: PEFT's own ``save_pretrained`` into
    ``adapter/`` (PiSSA / MiLoRA converted to a LoRA on the pretrained weights, :func:`save_peft_adapter`)."""
    stock = os.path.join(run_dir, ADAPTER_DIR)
    if pilora_masks(peft_model):
        compact = os.path.join(run_dir, PILORA_ADAPTER_DIR)
        peft_model.save_pretrained(compact)
        os.makedirs(stock, exist_ok=True)
        for name in (WEIGHTS, CONFIG):  # the same export: copied, not computed twice
            shutil.copyfile(os.path.join(compact, name), os.path.join(stock, name + ".tmp"))
            os.replace(os.path.join(stock, name + ".tmp"), os.path.join(stock, name))
    else:
        save_peft_adapter(peft_model, stock)
        dedupe_modules_to_save(stock)
    for folder in (stock, os.path.join(run_dir, PILORA_ADAPTER_DIR)):
        if os.path.isdir(folder):
            follow_umask(folder)  # safetensors writes 0600 whatever the umask
    return stock


def export_run(run_dir: str) -> str | None:
    """Bring one run folder to the current layout; returns what was done (None: nothing to do).

    * ``adapter/`` holding the compact form (the first layout): moved to ``adapter_pilora/``; its
      stock export is written to a temporary folder first and then becomes ``adapter/``;
    * ``adapter_pilora/`` holding the compact form (the second): converted in place to the two-part
      layout (:func:`finish_pilora_folder`); a missing ``adapter/`` is written from it.

    Each step leaves a folder that loads; rerun the command to finish an interrupted conversion."""
    stock, compact = os.path.join(run_dir, ADAPTER_DIR), os.path.join(run_dir, PILORA_ADAPTER_DIR)
    done = []
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
        done.append(f"exported rank {info['rank']} LoRA ({info['modules']} modules) to {stock}")
    if os.path.isdir(compact) and (layout(compact) == "compact" or _stock_is_compact(compact)):
        finish_pilora_folder(compact)
        done.append(f"{compact} now holds the stock export beside the compact form ({PILORA_FILE}: PILORA)")
    if os.path.isdir(compact) and not os.path.isfile(os.path.join(stock, WEIGHTS)):
        info = export_compact(compact, stock)  # a conversion interrupted between its two renames
        done.append(f"exported rank {info['rank']} LoRA ({info['modules']} modules) to {stock}")
    if os.path.isfile(os.path.join(stock, CONFIG)):
        dedupe_modules_to_save(stock)
    return "; ".join(done) or None


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
        description="Bring older runs to the current adapter layout: adapter/ a stock-PEFT LoRA (PiLoRA: "
        "the rank r + r' export), adapter_pilora/ that export plus PiLoRA's compact form."
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
