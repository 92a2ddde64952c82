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
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .clip import POOLING


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


def create_visual(model_cfg: dict) -> nn.Module:
    """The image tower of ``open_clip.create_model`` for ``model.openclip``:

    * ``name``: an open_clip model name (``ViT-B-32``) or ``local-dir:/path`` / ``hf-hub:org/repo``;
    * ``pretrained``: a tag (``openai``, ``laion2b_s34b_b79k``) or a checkpoint file; null = random init;
    * ``model_cfg``: an inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)
      registered under ``name`` (tiny test towers; nothing is downloaded).
    """
    import open_clip

    oc = dict(model_cfg.get("openclip") or {})  # the runner passes plain containers (no OmegaConf here)
    name = oc.get("name") or "ViT-B-32"
    if oc.get("model_cfg"):
        with tempfile.TemporaryDirectory() as tmp:  # open_clip reads model configs from json files
            with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                json.dump(oc["model_cfg"], f)
            open_clip.add_model_config(tmp)
            model = open_clip.create_model(name, pretrained=None)
    else:
        pretrained = oc.get("pretrained")
        try:
            model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=bool(pretrained))
        except (RuntimeError, OSError, ValueError) as err:
            raise FileNotFoundError(
                f"open_clip could not build {name!r} with pretrained={pretrained!r} ({err}); without network "
                "access, download the checkpoint once and set model.openclip.pretrained=/path/to/file.bin "
                "(or model.openclip.name=local-dir:/path)"
            ) from err
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
        # count equal to transformers' CLIPVisionModel (same tower, same accounting)
        visual.proj = None
        self.visual, self.pool, self.num_labels = visual, pool, num_labels
        self.classifier = nn.Linear(visual.transformer.width, num_labels)
        g = torch.Generator().manual_seed(torch.initial_seed())  # head = f(seed), as CLIPImageClassifier
        bound = 1.0 / self.classifier.in_features**0.5
        with torch.no_grad():
            self.classifier.weight.uniform_(-bound, bound, generator=g)
            self.classifier.bias.uniform_(-bound, bound, generator=g)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[B, 1 + P, D]`` (before ``ln_post``)."""
        return self.visual.transformer(self.visual._embeds(pixel_values))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return POOLING[self.pool](self.tokens(pixel_values), self.visual.ln_post)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_) -> ImageClassifierOutput:
        logits = self.classifier(self.features(pixel_values))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_classifier(model_cfg: dict, num_labels: int, pool: str | None = None) -> OpenCLIPImageClassifier:
    return OpenCLIPImageClassifier(create_visual(model_cfg), num_labels, pool or model_cfg.get("pool") or "mean_patch")
