"""The CLIP image tower built through open_clip (``model=clip-vit-b32-openclip``).

The task-arithmetic vision suite (Cars, DTD, EuroSAT, GTSRB, RESISC45, SUN397, SVHN) is worked on
with open_clip's ViT-B-32 checkpoints. This module builds that tower with ``open_clip.create_model``
(a built-in name with a pretrained tag such as ``openai`` / ``laion2b_s34b_b79k`` or a local
checkpoint file, or an inline ``model_cfg`` for tests) and puts the same linear head on it as
:class:`pilora.tasks.clip.CLIPImageClassifier`, with the same pooling choices.

LoRA targets. open_clip's blocks use ``nn.MultiheadAttention``, whose q, k, v live in one packed
``in_proj_weight`` (3D × D) that PEFT cannot adapt per projection. :func:`split_attention`
replaces every such module by :class:`SplitAttention`: separate ``q_proj`` / ``k_proj`` /
``v_proj`` / ``out_proj`` linears holding the same weights and computing the same output
(tested to float precision), so a block has the same six adapted maps as the transformers
tower: ``q_proj, k_proj, v_proj, out_proj`` and the MLP's ``c_fc`` / ``c_proj`` (fc1 / fc2), and
the same parameter count.

Activation. OpenAI's CLIP was trained with QuickGELU (``x·σ(1.702x)``); open_clip's built-in
``ViT-B-32`` config uses ``nn.GELU`` and relies on the pretrained registry to say which tags need
QuickGELU (``openai`` does; ``laion2b_s34b_b79k`` does not). :func:`quick_gelu` decides as open_clip's
registry does and :func:`create_visual` passes ``force_quick_gelu``, so the OpenAI weights compute what
they were trained to (transformers' CLIP tower with the same weights gives the same hidden states;
``tests/test_openclip.py``). The record says which (``evaluation.activation``).

Export. :func:`merged_visual_state_dict` merges a trained adapter into the weights and packs
``q_proj``/``k_proj``/``v_proj`` back into ``in_proj_weight``: the state dict of a stock open_clip
``model.visual``, for task-arithmetic code that loads fine-tuned image encoders.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .clip import POOLING, init_head


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` with q, k, v as three ``nn.Linear`` (same weights, same output)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "only self-attention with packed in_proj_weight and no bias_k/add_zero_attn "
                "(open_clip's vision blocks) can be split"
            )
        d, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self.dropout = mha.dropout
        w = mha.in_proj_weight.detach()
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            lin = nn.Linear(d, d, bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[i * d : (i + 1) * d])
                if b is not None:
                    lin.bias.copy_(b[i * d : (i + 1) * d])
            setattr(self, name, lin)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None, device=w.device, dtype=w.dtype)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, key_padding_mask=None, **_):
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:  # (L, B, D) -> (B, L, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, D = query.shape
        h = self.num_heads

        def heads(x):
            return x.view(B, x.shape[1], h, D // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # MultiheadAttention: True = not allowed
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        if key_padding_mask is not None:
            pad = key_padding_mask.view(B, 1, 1, -1)
            pad = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad.bool(), float("-inf"))
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, D))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def split_attention(module: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` under ``module`` by :class:`SplitAttention`; returns how many."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, SplitAttention(child))
            n += 1
        else:
            n += split_attention(child)
    return n


ACTIVATION_KEY = "model.openclip.quick_gelu"


def _plain(x):
    """Nested mappings / sequences (an OmegaConf node from a test, a dict from the runner) as plain
    dicts and lists: open_clip reads its model configs from json files."""
    from collections.abc import Mapping, Sequence

    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str):
        return [_plain(v) for v in x]
    return x


def _schema(name: str) -> tuple[str | None, str]:
    for schema in ("local-dir", "hf-hub"):
        if name.startswith(schema + ":"):
            return schema, name[len(schema) + 1 :]
    return None, name


def quick_gelu(model_cfg: dict) -> tuple[bool, str]:
    """Whether the tower of ``model.openclip`` uses QuickGELU, and what decided it.

    In order: ``model.openclip.quick_gelu`` when set; an inline ``model_cfg``'s ``quick_gelu``; for
    ``local-dir:`` / ``hf-hub:`` the folder's ``open_clip_config.json`` (open_clip reads it there); a
    model config that sets it (``ViT-B-32-quickgelu``); the pretrained tag's entry in open_clip's
    registry (``openai``: True); random init: the model config (False). A checkpoint *file* does not
    say how it was trained, so it needs ``model.openclip.quick_gelu`` (a ValueError says so)."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    oc = _plain(model_cfg.get("openclip") or {})
    name = oc.get("name") or "ViT-B-32"
    if oc.get("quick_gelu") is not None:
        return bool(oc["quick_gelu"]), ACTIVATION_KEY
    if oc.get("model_cfg"):
        return bool(oc["model_cfg"].get("quick_gelu", False)), "model.openclip.model_cfg"
    schema, ident = _schema(name)
    if schema is not None:
        if schema == "local-dir":
            file = os.path.join(ident, "open_clip_config.json")
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(ident, "open_clip_config.json")
        with open(file) as f:
            return bool(json.load(f).get("model_cfg", {}).get("quick_gelu", False)), file
    clean = name.replace("/", "-")
    arch = open_clip.get_model_config(clean) or {}
    if arch.get("quick_gelu"):
        return True, f"open_clip model config {clean}"
    pretrained = oc.get("pretrained")
    if not pretrained:
        return False, f"open_clip model config {clean} (random init)"
    tag = get_pretrained_cfg(clean, pretrained)
    if tag:
        return bool(tag.get("quick_gelu", False)), f"open_clip pretrained registry {clean}:{pretrained}"
    quick = [t for t in list_pretrained_tags_by_model(clean) if get_pretrained_cfg(clean, t).get("quick_gelu")]
    raise ValueError(
        f"model.openclip.pretrained={pretrained!r} is a checkpoint file, which does not say which activation "
        f"it was trained with: set {ACTIVATION_KEY}=true for weights trained with QuickGELU (open_clip's "
        f"registry marks these tags of {clean}: {quick or 'none'}) or false for nn.GELU (the other tags)"
    )


def activation(visual: nn.Module) -> str:
    """``"quick_gelu"`` or ``"gelu"``: the MLP activation of a built open_clip ViT tower."""
    from open_clip.transformer import QuickGELU

    acts = {type(block.mlp.gelu) for block in visual.transformer.resblocks}
    if acts == {QuickGELU}:
        return "quick_gelu"
    if acts == {nn.GELU}:
        return "gelu"
    raise ValueError(f"the tower's blocks use activations {sorted(a.__name__ for a in acts)}; expected one of them")


def create_visual(model_cfg: dict) -> nn.Module:
    """The image tower of ``open_clip.create_model`` for ``model.openclip``:

    * ``name``: an open_clip model name (``ViT-B-32``) or ``local-dir:/path`` / ``hf-hub:org/repo``;
    * ``pretrained``: a tag (``openai``, ``laion2b_s34b_b79k``) or a checkpoint file; null = random init;
    * ``model_cfg``: an inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)
      registered under ``name`` (tiny test towers; nothing is downloaded);
    * ``quick_gelu``: null = decided as open_clip's registry decides (:func:`quick_gelu`), or true/false.
    """
    import open_clip

    oc = _plain(model_cfg.get("openclip") or {})
    name = oc.get("name") or "ViT-B-32"
    if oc.get("model_cfg"):
        with tempfile.TemporaryDirectory() as tmp:  # open_clip reads model configs from json files
            with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                json.dump(oc["model_cfg"], f)
            open_clip.add_model_config(tmp)
    quick, decided_by = quick_gelu(model_cfg)
    pretrained = oc.get("pretrained")
    try:
        # quick_gelu as a keyword is open_clip's last override of the model config, so false also holds
        # against a config that sets it; force_quick_gelu is what open_clip's tag check reads
        model = open_clip.create_model(
            name,
            pretrained=pretrained,
            require_pretrained=bool(pretrained),
            force_quick_gelu=quick,
            quick_gelu=quick,
        )
    except (RuntimeError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"open_clip could not build {name!r} with pretrained={pretrained!r} ({err}); without network "
            "access, download the checkpoint once and set model.openclip.pretrained=/path/to/file.bin "
            f"and {ACTIVATION_KEY} (or model.openclip.name=local-dir:/path)"
        ) from err
    built = activation(model.visual)
    if built != ("quick_gelu" if quick else "gelu"):  # open_clip ignored the request (a timm tower)
        raise ValueError(f"{name}: asked open_clip for quick_gelu={quick} ({decided_by}), it built {built}")
    return model.visual


class OpenCLIPImageClassifier(nn.Module):
    """open_clip image tower + linear head on pooled tokens (the head of ``CLIPImageClassifier``).

    ``pool``: a key of :data:`pilora.tasks.clip.POOLING` (the default ``mean_patch`` is GOAT's: the mean
    of the last block's patch tokens, CLS excluded, no LayerNorm), with ``ln_post`` as the LayerNorm.
    """

    def __init__(self, visual: nn.Module, num_labels: int, pool: str = "mean_patch"):
        super().__init__()
        if pool not in POOLING:
            raise ValueError(
                f"unknown pooling {pool!r} for the CLIP head; choose one of {sorted(POOLING)} (model.pool)"
            )
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if not hasattr(visual, "_embeds") or not hasattr(visual, "transformer"):
            raise ValueError(f"{type(visual).__name__} is not an open_clip VisionTransformer (ViT models only)")
        split_attention(visual)
        # the image->text projection is not used by the head; dropping it keeps the parameter
        # count equal to transformers' CLIPVisionModel (same tower, same accounting). A copy stays
        # as a non-persistent buffer (not trained, not counted, not in checkpoints) so that
        # merged_visual_state_dict returns a complete stock ``model.visual``
        proj = visual.proj
        visual.proj = None
        self.register_buffer("image_projection", None if proj is None else proj.detach().clone(), persistent=False)
        self.visual, self.pool, self.num_labels = visual, pool, num_labels
        self.classifier = nn.Linear(visual.transformer.width, num_labels)
        init_head(self.classifier)  # as CLIPImageClassifier's: the same head for the same seed

    @property
    def activation(self) -> str:
        """The tower's MLP activation (``"quick_gelu"`` or ``"gelu"``), read from the built modules."""
        return activation(self.visual)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[B, 1 + P, D]`` (before ``ln_post``); the images are cast to the
        tower's dtype (a bf16 tower, model.dtype=bfloat16), as transformers' CLIP embeddings do."""
        return self.visual.transformer(self.visual._embeds(pixel_values.to(self.visual.conv1.weight.dtype)))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return POOLING[self.pool](self.tokens(pixel_values), self.visual.ln_post)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_) -> ImageClassifierOutput:
        logits = self.classifier(self.features(pixel_values))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_classifier(model_cfg: dict, num_labels: int, pool: str | None = None) -> OpenCLIPImageClassifier:
    return OpenCLIPImageClassifier(create_visual(model_cfg), num_labels, pool or model_cfg.get("pool") or "mean_patch")


def _classifier(model: nn.Module) -> OpenCLIPImageClassifier:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, OpenCLIPImageClassifier):
        raise TypeError(
            f"{type(base).__name__} is not an OpenCLIPImageClassifier (model=*-openclip); "
            "only open_clip towers have a packed in_proj_weight to export to"
        )
    return base


@torch.no_grad()
def merged_visual_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a stock open_clip ``model.visual`` with the trained update merged in.

    ``model``: an :class:`OpenCLIPImageClassifier`, bare or wrapped by PEFT (LoRA, PiLoRA, PiSSA,
    ...). The adapter is merged into a copy (PEFT's ``merge_and_unload``: ``W0 + ΔW`` for every
    method; the model itself is left as it is), each ``SplitAttention`` is packed back into
    ``in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked, as ``nn.MultiheadAttention`` stores them)
    and the image projection ``proj`` is put back, so
    ``open_clip.create_model(name).visual.load_state_dict(sd)`` loads it strictly and computes the
    adapted tower. Tensors are on the cpu. The linear head is not part of it (``model.classifier``)."""
    import copy

    classifier = _classifier(model)
    merged = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    visual = _classifier(merged).visual
    out = {}
    for key, value in visual.state_dict().items():
        out[key] = value.detach().cpu().clone()
    for name, module in visual.named_modules():
        if not isinstance(module, SplitAttention):
            continue
        prefix = f"{name}." if name else ""
        parts = [getattr(module, p) for p in ("q_proj", "k_proj", "v_proj")]
        for p in ("q_proj", "k_proj", "v_proj"):
            out.pop(f"{prefix}{p}.weight")
            out.pop(f"{prefix}{p}.bias", None)
        out[f"{prefix}in_proj_weight"] = torch.cat([lin.weight.detach().cpu() for lin in parts])
        if parts[0].bias is not None:
            out[f"{prefix}in_proj_bias"] = torch.cat([lin.bias.detach().cpu() for lin in parts])
    if classifier.image_projection is not None:
        out["proj"] = classifier.image_projection.detach().cpu().clone()
    return out


def save_merged_visual(model: nn.Module, path: str) -> str:
    """Write :func:`merged_visual_state_dict` to ``path`` (safetensors); returns ``path``.

    Load it into a stock model with ``clip.visual.load_state_dict(safetensors.torch.load_file(path))``."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in merged_visual_state_dict(model).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


MERGED_FILE = "openclip_visual.safetensors"


def export_run(run_dir: str, out: str | None = None) -> str:
    """Write :func:`save_merged_visual` for a finished ``model=*-openclip`` run; returns the file.

    The tower is rebuilt from the run's record (``results.json``: model and task config, seed; the
    pretrained weights as the run loaded them), the trained weights loaded from ``adapter/`` (stock
    PEFT, every adapter method) or ``model/`` (``method=full``), merged and packed."""
    import glob

    from peft import PeftModel

    from .base import make_task

    record = os.path.join(run_dir, "results.json")
    if not os.path.isfile(record):
        raise FileNotFoundError(f"{record} not found: {run_dir!r} is not a finished run folder")
    with open(record) as f:
        cfg = json.load(f)["config"]
    if cfg["model"].get("backend") != "open_clip":
        raise ValueError(
            f"{run_dir} trained model={cfg['model'].get('name')!r}, not an open_clip tower (model=*-openclip)"
        )
    seed = int(cfg["seed"])
    torch.manual_seed(seed)  # the head and a randomly initialised tower as the run built them
    model = make_task(cfg["task"], cfg["model"], seed).build_model()
    adapter, full = os.path.join(run_dir, "adapter"), os.path.join(run_dir, "model")
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        model = PeftModel.from_pretrained(model, adapter)
    elif glob.glob(os.path.join(full, "*.safetensors")):
        from safetensors.torch import load_file

        state = {}
        for file in sorted(glob.glob(os.path.join(full, "*.safetensors"))):
            state.update(load_file(file))
        model.load_state_dict(state, strict=False)
    else:
        raise FileNotFoundError(f"{run_dir} holds neither adapter/ nor model/ (was it run with save_adapter=false?)")
    return save_merged_visual(model, out or os.path.join(run_dir, MERGED_FILE))


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description="Merge a model=*-openclip run's trained update into a stock open_clip image tower "
        f"(q, k, v packed into in_proj_weight): <run>/{MERGED_FILE}, for clip.visual.load_state_dict"
    )
    p.add_argument("run_dirs", nargs="+")
    args = p.parse_args(argv)
    status = 0
    for run in args.run_dirs:
        try:
            print(f"{run}: wrote {export_run(run)}")
        except (FileNotFoundError, ValueError, KeyError) as err:
            print(f"error: {run}: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    # `python -m` runs this file as __main__, and rebuilding the run's tower imports it again as
    # pilora.tasks.openclip: two modules, two OpenCLIPImageClassifier classes, and the tower (the
    # package module's class) would fail _classifier's isinstance check here. The package module's
    # main keeps every name in one module.
    from pilora.tasks.openclip import main as _main

    sys.exit(_main())
