"""Stage 2 of PiLoRA: the dominant / supplementary adapter pair of Eq. 10, on top of PEFT.

    h = W0 x + s_d·(M ⊗ B_d) A_d x + s_s·(M̄ ⊗ B_s) A_s x                       (Eq. 10)

A PEFT ``lora.Linear`` keeps its structure; two of its sub-modules are swapped:

* ``lora_A[adapter]`` becomes one ``(r + r') × n`` linear: ``A_d`` stacked on ``A_s`` (one GEMM);
* ``lora_B[adapter]`` becomes :class:`RowPartitionedB`: ``B_d`` and ``B_s`` in their places of one
  ``m × (r + r')`` tensor whose structural zeros get exactly-zero gradients, so the adapter costs
  what a LoRA adapter of rank ``r + r'`` costs per module and step (no per-row work on
  activations, no index copies, no Python ``autograd.Function``). On its own a layer keeps the
  zeros with one tiny elementwise product forward and backward; under a
  :class:`StepGradientMask` (what :class:`pilora.trainer.PiLoRATrainer` uses) not even that: one
  multi-tensor product of all layers' gradients per step.

Because the swapped ``lora_B`` exposes ``.weight`` (the ``m × (r + r')`` matrix
``[M ⊗ B_d, c·M̄ ⊗ B_s]``), PEFT's own ``merge`` / ``unmerge`` / ``merge_and_unload`` /
``disable_adapter`` (Eq. 11) work unchanged.

The layer's adapter forward is registered as a PEFT ``LoraVariant`` (:class:`FusedLoraForward`): it
adds ``s · z Bᵀ`` to the base output with one ``addmm`` instead of PEFT's ``result + B(z) * s``,
which costs two extra elementwise passes over the ``tokens × m`` output forward and one backward.
On a small model those passes cost about as much as the ``r'`` extra directions (see
benchmarks/README.md, which also reports LoRA with the same fused forward).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from .peft_layers import canonical_name, lora_layers

PILORA_FILE = "pilora_config.json"  # PiLoRA's own config ("peft_type": "PILORA")
PILORA_WEIGHTS = "pilora_model.safetensors"  # B_d, B_s and the masks (the rest is in the stock file)
# PEFT flags 1-D tensors under lora_B as unsharded ZeRO/FSDP state; ours is the partition mask.
warnings.filterwarnings(
    "ignore", message=r"Adapter .*LoRA tensor\(s\) have invalid shape: \S*lora_B\.(dominant|supplementary)"
)


class RowPartitionedB(nn.Module):
    """The ``B`` of a PiLoRA layer: the dominant block ``B_d (|M| × r)`` and the supplementary block
    ``B_s ((m−|M|) × r')`` of Eq. 10, kept in their places of one ``m × (r + r')`` tensor.

    ``blocks[i, :r]`` is row ``i`` of ``B_d`` when row ``i`` is dominant, ``blocks[i, r:]`` row ``i``
    of ``B_s`` when it is supplementary; every other entry is a *structural zero*. The layer uses
    ``weight = blocks ⊙ P`` with the fixed pattern ``P`` (1 on the dominant block, ``c = s_s/s_d`` on
    the supplementary block, 0 elsewhere), so

    * the forward is one elementwise product of ``m·(r+r')`` numbers and the backward one more
      (``∂blocks = ∂weight ⊙ P``): no index copies, no Python ``autograd.Function``;
    * a structural zero gets an exactly-zero gradient, so it stays exactly zero under SGD, Adam(W)
      (zero moments, decoupled decay of 0) and gradient clipping (it adds 0 to the norm), and the
      trained values equal those of separately stored ``B_d``, ``B_s`` (Eq. 10 holds exactly);
    * the optimizer does hold the structural zeros: ``m·(r+r')`` stored numbers for the
      ``|M|·r + (m−|M|)·r'`` effective parameters (see :meth:`effective_numel` and
      :func:`pilora.params.count_parameters`, which reports both).

    Under a :class:`StepGradientMask` (``c = 1``) the product moves out of the forward and backward:
    ``weight`` is ``blocks`` itself and the mask multiplies the gradient by ``P`` once per step.

    The state dict holds the compact blocks (``dominant``, ``supplementary``) and the mask, as a
    compact parameterisation would, so saved adapters and checkpoints keep their layout.

    Args:
        dominant_mask: bool ``(m,)``, ``M`` of Eq. 9.
        r: dominant rank. r_s: supplementary rank ``r'`` (0 freezes the supplementary rows).
        supplementary_scale: ``c = s_s / s_d`` applied to the supplementary block.
    """

    def __init__(
        self, dominant_mask: torch.Tensor, r: int, r_s: int, supplementary_scale: float = 1.0, device=None, dtype=None
    ):
        super().__init__()
        mask = dominant_mask.to(device="cpu", dtype=torch.bool).flatten()
        m, n_dom = mask.numel(), int(mask.sum())
        self.r, self.r_s, self.supplementary_scale = int(r), int(r_s), float(supplementary_scale)
        self.n_dominant = n_dom
        self.blocks = nn.Parameter(torch.zeros(m, self.r + self.r_s, device=device, dtype=dtype))
        # Persistent so a saved adapter carries its partition; int8 because safetensors and DDP
        # broadcast handle it everywhere (bool buffers are not universally supported).
        self.register_buffer("dominant_mask", mask.to(torch.int8).to(device=device))
        # P, built on the cpu (construction may run under a meta context), then moved. In the
        # parameter's dtype: a bool P would cost a dtype conversion in every forward and backward
        pattern = torch.zeros(m, self.r + self.r_s, dtype=torch.float64, device="cpu")
        pattern[mask, : self.r] = 1.0
        pattern[~mask, self.r :] = self.supplementary_scale
        rows = torch.arange(m, device="cpu")
        # Derived from the mask, so plain attributes rather than buffers: DDP broadcasts every buffer
        # at every forward (the pattern alone is m·(r+r') numbers per layer); _apply moves them.
        self.pattern = pattern.to(device=device, dtype=self.blocks.dtype)
        self.dominant_rows = rows[mask].to(device=device)
        self.supplementary_rows = rows[~mask].to(device=device)
        # True while a StepGradientMask holds the structural zeros (see there): ``weight`` is then the
        # leaf itself, with no product in the forward or the backward
        self.masked_per_step = False

    @property
    def out_features(self) -> int:
        return self.dominant_mask.numel()

    def effective_numel(self) -> int:
        """Parameters of Eq. 10 (the paper's count): ``|M|·r + (m−|M|)·r'``."""
        return self.n_dominant * self.r + (self.out_features - self.n_dominant) * self.r_s

    @property
    def weight(self) -> torch.Tensor:
        """The ``m × (r + r')`` matrix ``[M ⊗ B_d, c·(M̄ ⊗ B_s)]`` (differentiable).

        ``blocks ⊙ P``; under a :class:`StepGradientMask` (``c = 1`` only) the leaf ``blocks`` itself,
        whose structural zeros are zero because the mask zeroes their gradients every step."""
        if self.masked_per_step:
            return self.blocks
        blocks = self.blocks
        self._follow(blocks.device)
        return blocks * self.pattern

    def _follow(self, device: torch.device) -> None:
        """Keep the derived tensors where ``blocks`` is: FSDP2's ``fully_shard`` moves a module's
        parameters and buffers to the GPU itself, without ``_apply`` (through which a plain ``.to()``
        moves them too)."""
        if self.pattern.device != device:  # the derived tensors always move together
            for name in self._DERIVED:
                setattr(self, name, getattr(self, name).to(device))

    def structural_zeros_moved(self) -> bool:
        """Whether a structural zero of ``blocks`` is non-zero (one device→host read)."""
        self._follow(self.blocks.device)
        return bool(torch.count_nonzero(self.blocks.detach() * (self.pattern == 0)))

    def _full_blocks(self) -> torch.Tensor:
        """``blocks``, all-gathered first when FSDP2 holds it as a row-sharded DTensor (outside the
        forward: state dicts, exports); the row indices below address the full matrix."""
        from torch.distributed.tensor import DTensor

        blocks = self.blocks.full_tensor() if isinstance(self.blocks, DTensor) else self.blocks
        self._follow(blocks.device)
        return blocks

    @property
    def dominant(self) -> torch.Tensor:
        """``B_d (|M| × r)``, gathered (a copy, differentiable); write with :meth:`set_blocks`."""
        return self._full_blocks()[self.dominant_rows, : self.r]

    @property
    def supplementary(self) -> torch.Tensor:
        """``B_s ((m−|M|) × r')``, gathered (a copy, differentiable); write with :meth:`set_blocks`."""
        return self._full_blocks()[self.supplementary_rows, self.r :]

    @torch.no_grad()
    def set_blocks(self, dominant: torch.Tensor | None = None, supplementary: torch.Tensor | None = None) -> None:
        """Write ``B_d`` and/or ``B_s`` (compact shapes) into their rows; structural zeros stay zero.
        Under FSDP2 (``blocks`` a DTensor) every rank writes the full matrix and keeps its own rows."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        sharded = self.blocks if isinstance(self.blocks, DTensor) else None
        blocks = self._full_blocks()
        for value, rows, cols, name in (
            (dominant, self.dominant_rows, slice(0, self.r), "dominant"),
            (supplementary, self.supplementary_rows, slice(self.r, None), "supplementary"),
        ):
            if value is None:
                continue
            shape = (rows.numel(), cols.indices(blocks.shape[1])[1] - cols.indices(blocks.shape[1])[0])
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} block must have shape {shape} (rows × rank), got {tuple(value.shape)}")
            blocks[rows, cols] = value.to(blocks)
        if sharded is not None:  # every rank holds the same full matrix: split it locally, no communication
            local = distribute_tensor(blocks, sharded.device_mesh, sharded.placements, src_data_rank=None)
            sharded.to_local().copy_(local.to_local())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight)

    _DERIVED = ("pattern", "dominant_rows", "supplementary_rows")

    def derived_tensors(self) -> list[torch.Tensor]:
        """The tensors derived from the mask and kept off the buffers (``P`` is as large as
        ``blocks``): memory the layer holds that ``parameters()`` and ``buffers()`` do not list."""
        return [getattr(self, name) for name in self._DERIVED]

    def _apply(self, fn, recurse=True):
        # .to / .cuda / .half / ... reach the derived tensors as they reach the buffers
        super()._apply(fn, recurse)
        for name, t in zip(self._DERIVED, self.derived_tensors()):
            setattr(self, name, fn(t))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the compact blocks below would hide a moved zero, i.e. a model that trained outside Eq. 10
        if self.masked_per_step and self.structural_zeros_moved():
            raise RuntimeError(
                f"{prefix[:-1]}: structural zeros of B are non-zero, so this layer did not train as Eq. 10. "
                "Its gradients are masked once per step by a pilora.layer.StepGradientMask, and the "
                "training loop did not call the mask between backward and clipping / optimizer step. "
                "Call mask() there (pilora's Trainer does), or mask.remove() to go back to the "
                "per-forward product, which needs no call."
            )
        destination[prefix + "dominant_mask"] = self.dominant_mask if keep_vars else self.dominant_mask.detach()
        if _is_dtensor(self.blocks):
            # FSDP2 (training checkpoints, its gathers) addresses tensors by parameter name and shards
            # them by rows: the sharded leaf itself; the compact blocks are written from the gathered model
            destination[prefix + "blocks"] = self.blocks if keep_vars else self.blocks.detach()
            return
        destination[prefix + "dominant"] = self.dominant.detach()
        destination[prefix + "supplementary"] = self.supplementary.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "dominant_mask"
        if key in state_dict and not torch.equal(state_dict[key].cpu().to(torch.int8), self.dominant_mask.cpu()):
            raise ValueError(
                f"{prefix[:-1]}: saved dominant rows differ from this layer's partition; "
                "load with pilora.load_adapter, which rebuilds the layers from the saved masks"
            )
        if key not in state_dict:
            missing_keys.append(key)
        if prefix + "blocks" in state_dict:  # the FSDP2 form written above: the parameter as it is
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        blocks = {}
        for name, shape in (
            ("dominant", (self.n_dominant, self.r)),
            ("supplementary", (self.out_features - self.n_dominant, self.r_s)),
        ):
            k = prefix + name
            if k not in state_dict:
                missing_keys.append(k)
                continue
            value = state_dict[k]
            if tuple(value.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {k}: copying a param with shape {tuple(value.shape)} from "
                    f"checkpoint, the shape in current model is {shape}."
                )
                continue
            blocks[name] = value
        if blocks:
            self.set_blocks(**blocks)
        if strict:
            known = {prefix + n for n in ("dominant", "supplementary", "dominant_mask")}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def extra_repr(self) -> str:
        return (
            f"rows={self.out_features}, dominant={self.n_dominant} (r={self.r}), "
            f"supplementary={self.out_features - self.n_dominant} (r'={self.r_s}), "
            f"stored={self.blocks.numel()}, effective={self.effective_numel()}"
        )


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def compact_fsdp_state(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` with each FSDP2-form ``<layer>.blocks`` (what a sharded model's state dict,
    gathered by ``transformers.Trainer`` / accelerate, holds) replaced by the compact
    ``<layer>.dominant`` / ``<layer>.supplementary`` of an unsharded one, read with ``model``'s rows."""
    out = dict(state_dict)
    for name, layer in model.named_modules():
        blocks = out.pop(f"{name}.blocks", None) if isinstance(layer, RowPartitionedB) else None
        if blocks is not None:
            out[f"{name}.dominant"] = blocks[layer.dominant_rows.to(blocks.device), : layer.r]
            out[f"{name}.supplementary"] = blocks[layer.supplementary_rows.to(blocks.device), layer.r :]
    return out


class StepGradientMask:
    """Holds the structural zeros of every PiLoRA ``B`` in a model with one multi-tensor product per
    step, ``∂blocks ← ∂blocks ⊙ P`` over all layers at once, instead of the product ``blocks ⊙ P`` in
    each layer's forward and backward.

    While the mask is on, each layer's ``weight`` is its leaf ``blocks`` (its zeros are zero), so a
    layer runs exactly what a LoRA layer of rank ``r + r'`` runs; the structural zeros get a
    gradient in the backward, and ``mask()`` zeroes it. Call it after the backward (after the last
    micro-batch's, or after each) and before gradient clipping and the optimizer step: the gradients
    the clipping norm and the optimizer see are then the same as the product gives, so training is
    the same (Eq. 10 exactly; ``tests/test_layer.py``). On a GPU that is one multi-tensor kernel per
    step instead of two kernels and one autograd node per layer and step.

    Only layers with ``c = s_s/s_d = 1`` (the default) are taken; others keep the product. A
    training loop that never calls the mask moves the zeros; saving such a layer raises
    (:meth:`RowPartitionedB.structural_zeros_moved`). ``remove()`` returns the layers to the product.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, RowPartitionedB) and m.supplementary_scale == 1.0]
        for layer in self.layers:
            layer.masked_per_step = True

    def __bool__(self) -> bool:
        return bool(self.layers)

    def __call__(self) -> None:
        grads, patterns = [], []
        for layer in self.layers:
            state = layer.__dict__  # not nn.Module.__getattr__: microseconds per layer and step
            grad = state["_parameters"]["blocks"].grad
            if grad is not None:
                grads.append(grad)
                patterns.append(state["pattern"])
        if grads:
            torch._foreach_mul_(grads, patterns)

    def remove(self) -> None:
        for layer in self.layers:
            layer.masked_per_step = False
        self.layers = []


class FusedLoraForward(LoraVariant):
    """PEFT ``LoraVariant`` that adds the adapter with one ``addmm`` into the base output.

    Works for any layer whose ``lora_B`` exposes ``.weight``: the PiLoRA layer uses it always;
    ``MethodConfig.fused_forward`` puts it on plain LoRA layers for like-for-like timings.
    Merging is PEFT's vanilla one (``get_delta_weight`` = ``s · B A``).
    """

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:  # attached to layers already built
        pass

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        """``result + s · (B (A dropout(x)))`` as one GEMM that accumulates into ``result``.

        Written on 2-D views with ``mm``/``addmm`` rather than ``F.linear`` on the 3-D input: the same
        two GEMMs, but ``linear``/``matmul`` add a reshape, an ``_unsafe_view`` and their backward
        nodes per call, and on a GPU whose step is bound by host work every operator counts."""
        x = module.lora_dropout[active_adapter](x)
        A = module.lora_A[active_adapter].weight
        W = module.lora_B[active_adapter].weight
        scaling = module.scaling[active_adapter]
        if result.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # fp32 adapters on a bf16 base (PEFT's autocast_adapter_dtype): add in the adapter's dtype,
            # as PEFT's type promotion does; its forward casts the sum back to the base dtype
            result = result.to(x.dtype)
        out = torch.addmm(_rows(result), torch.mm(_rows(x), A.t()), W.t(), alpha=scaling)
        return out if result.dim() == 2 else out.view(result.shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D (tokens × features) tensor: itself, a view, or (non-contiguous) a copy."""
    if t.dim() == 2:
        return t
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def supplementary_scale(
    r: int, r_s: int, alpha: float, supplementary_alpha: float | None, use_rslora: bool = False
) -> float:
    """``c = s_s / s_d``. With ``supplementary_alpha=None`` both groups share ``s = α/r`` (the
    supplementary adapter is "the same LoRA, fewer directions"); otherwise ``s_s = α'/r'``."""
    if r_s == 0 or supplementary_alpha is None:
        return 1.0
    if use_rslora:
        return (supplementary_alpha / math.sqrt(r_s)) / (alpha / math.sqrt(r))
    return (supplementary_alpha / r_s) / (alpha / r)


def check_mask(mask, m: int, name: str = "") -> torch.Tensor:
    """A dominant mask as a bool CPU tensor of ``m`` entries, or a ValueError that says how to fix it.

    Any device is accepted (the mask is read once, when the layer is built); values must be 0/1."""
    where = f" for {name}" if name else ""
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.device.type == "meta":
        raise ValueError(
            f"dominant mask{where} is on the meta device and has no values: build the masks "
            "from real importance statistics (pilora.partition) on the cpu or the model's device"
        )
    if mask.dim() != 1 or mask.numel() != m:
        raise ValueError(
            f"dominant mask{where} has shape {tuple(mask.shape)} but the layer has {m} output rows: "
            "pass one 1-D mask of length m per layer, from statistics of the same model and "
            "target_modules (ImportanceStats.check_matches tells which)"
        )
    mask = mask.detach().to("cpu")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"dominant mask{where} must be bool (or 0/1), got dtype {mask.dtype} with other values")
        mask = mask.bool()
    return mask


def convert_layer(
    layer: nn.Module, mask: torch.Tensor, r_s: int, scale: float = 1.0, adapter_name: str = "default"
) -> None:
    """Turn one PEFT ``lora.Linear`` (rank ``r``) into a PiLoRA layer in place (fresh init:
    ``A`` Kaiming-uniform as PEFT does, ``B`` zero, so the output equals the base model's)."""
    base = layer.get_base_layer()
    m, n = base.weight.shape
    mask = check_mask(mask, m)
    old_A = layer.lora_A[adapter_name].weight
    r = int(layer.r[adapter_name])
    A = nn.Linear(n, r + r_s, bias=False, device=old_A.device, dtype=old_A.dtype)
    nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
    layer.lora_A[adapter_name] = A
    layer.lora_B[adapter_name] = RowPartitionedB(mask, r, r_s, scale, device=old_A.device, dtype=old_A.dtype)
    layer.lora_variant[adapter_name] = FusedLoraForward()


def to_pilora(
    peft_model: nn.Module,
    masks: dict[str, torch.Tensor],
    supplementary_r: int,
    supplementary_alpha: float | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Convert every LoRA layer of a freshly made PEFT LoRA model (rank ``r``) into a PiLoRA layer.

    ``masks`` maps base-model module names (as in the importance statistics) to bool ``(m,)``.
    """

    layers = lora_layers(peft_model, adapter_name)
    missing = sorted(set(layers) - set(masks))
    if missing:
        raise ValueError(
            f"no dominant mask for LoRA layers {missing[:5]}; the masks cover "
            f"{sorted(masks)[:5]} ... (statistics from a different target_modules?)"
        )
    cfg = peft_model.peft_config[adapter_name]
    scale = supplementary_scale(cfg.r, supplementary_r, cfg.lora_alpha, supplementary_alpha, cfg.use_rslora)
    for name, layer in layers.items():
        mask = check_mask(masks[name], layer.get_base_layer().weight.shape[0], name)
        convert_layer(layer, mask, supplementary_r, scale, adapter_name)
    peft_model.pilora_config = {
        "supplementary_r": int(supplementary_r),
        "supplementary_alpha": supplementary_alpha,
        "supplementary_scale": scale,
    }
    # saves of this model write folders stock PEFT and load_adapter both read (PiLoRASaving)
    peft_model.__class__ = pilora_model_class(type(peft_model))
    return peft_model


def pilora_masks(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The dominant masks a PiLoRA model was built with, keyed by base-model module name."""

    return {
        name: layer.lora_B[adapter_name].dominant_mask.bool().cpu()
        for name, layer in lora_layers(peft_model, adapter_name).items()
        if isinstance(layer.lora_B[adapter_name], RowPartitionedB)
    }


class PiLoRASaving:
    """What a PiLoRA ``PeftModel`` adds to PEFT's own: folders that every loader can read.

    :func:`to_pilora` makes the model an instance of a subclass of its PEFT class with this mixin
    first, so everything that saves through PEFT (``save_pretrained``, ``transformers.Trainer``'s
    ``save_model`` and checkpoints) writes, for each PiLoRA adapter:

    * ``adapter_config.json`` + ``adapter_model.safetensors``: a plain LoRA of rank ``r + r'`` whose
      update equals the PiLoRA update (Sec. 3.3), which stock ``peft.PeftModel.from_pretrained``
      loads with no PiLoRA code;
    * ``pilora_config.json`` (``"peft_type": "PILORA"``: the rank ``r`` LoRA it was built from plus
      ``supplementary_r``, ``supplementary_alpha``, ``supplementary_scale``) and
      ``pilora_model.safetensors`` (``B_d``, ``B_s`` and the partition masks), from which
      :func:`load_adapter` and this class's ``load_adapter`` rebuild the compact model exactly
      (``A`` and the fully trained modules are read from the stock file, where they are stored as
      they are).

    PEFT's method registry (``peft.utils.register_peft_method``) cannot take PiLoRA: it requires a
    member of PEFT's closed ``PeftType`` enum and a prefix other than ``lora_``, which PiLoRA's
    layers (PEFT LoRA layers with a partitioned ``B``) keep."""

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, selected_adapters=None, **kwargs):
        """PEFT's ``save_pretrained``; PiLoRA adapters in the layout described in the class docstring
        (always safetensors). Other adapters of the same model are saved as PEFT saves them."""
        import shutil
        import tempfile

        from .export import finish_pilora_folder

        names = list(selected_adapters or self.peft_config)
        pilora = [n for n in names if pilora_masks(self, n)]
        if not pilora:
            return super().save_pretrained(save_directory, safe_serialization, names, **kwargs)
        if kwargs.get("path_initial_model_for_weight_conversion"):
            raise ValueError("PiLoRA adapters need no init conversion (W0 is not changed at init); drop the argument")
        if not kwargs.get("is_main_process", True):
            return None
        if kwargs.get("state_dict") is not None:  # a gathered FSDP2 state dict holds the sharded leaf
            kwargs["state_dict"] = compact_fsdp_state(self, kwargs["state_dict"])
        os.makedirs(save_directory, exist_ok=True)
        # PEFT writes the compact form (its config, weights, model card) to a scratch folder beside
        # the target; it is converted there and then moved over, so the target never holds a half
        tmp = tempfile.mkdtemp(prefix=".pilora-save-", dir=save_directory)
        try:
            super().save_pretrained(tmp, True, names, **kwargs)
            for name in pilora:
                finish_pilora_folder(tmp if name == "default" else os.path.join(tmp, name), self.pilora_config)
            for entry in os.listdir(tmp):
                src, dst = os.path.join(tmp, entry), os.path.join(save_directory, entry)
                if os.path.isdir(src):
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                else:
                    os.replace(src, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return None

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, **kwargs):
        """PEFT's ``load_adapter``; into an existing PiLoRA adapter (a ``Trainer`` resuming or loading
        its best checkpoint) the compact weights of a PiLoRA folder are loaded exactly."""
        folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else str(model_id)
        if adapter_name not in self.peft_config or not pilora_masks(self, adapter_name):
            return super().load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        from peft import set_peft_model_state_dict

        from .export import read_pilora_folder

        _, _, state = read_pilora_folder(folder)
        result = set_peft_model_state_dict(self, state, adapter_name=adapter_name)
        bad = [k for k in result.unexpected_keys if "lora_" in k]
        if bad:
            raise ValueError(f"{folder}: saved adapter has weights this model has no place for: {bad[:5]}")
        missing = [k for k in result.missing_keys if "lora_" in k and adapter_name in k]
        result.missing_keys.clear()
        result.missing_keys.extend(missing)
        if not is_trainable:  # as PEFT: an adapter loaded for inference runs without dropout
            self.eval()
        return result


_PILORA_CLASSES: dict[type, type] = {}


def pilora_model_class(cls: type) -> type:
    """The subclass of PEFT model class ``cls`` with :class:`PiLoRASaving` first (one per class)."""
    if issubclass(cls, PiLoRASaving):
        return cls
    if cls not in _PILORA_CLASSES:
        sub = type(f"PiLoRA{cls.__name__}", (PiLoRASaving, cls), {"__module__": __name__, "__doc__": cls.__doc__})
        _PILORA_CLASSES[cls] = sub
        globals()[sub.__name__] = sub  # so pickle finds it by name
    return _PILORA_CLASSES[cls]


def save_adapter(peft_model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Save a PiLoRA adapter (the layout of :class:`PiLoRASaving`: a stock rank ``r + r'`` LoRA plus
    the compact form); the same as ``peft_model.save_pretrained(path)`` for one adapter."""
    peft_model.save_pretrained(path, selected_adapters=[adapter_name])


def load_adapter(base_model: nn.Module, path: str, is_trainable: bool = False) -> nn.Module:
    """Rebuild a saved PiLoRA model on ``base_model``: the masks come from the saved weights.

    ``path``: a folder written by :func:`save_adapter` / ``save_pretrained`` / ``Trainer.save_model``
    of a PiLoRA model, or one in the older compact layout (``pilora_config.json`` beside a rank ``r``
    LoRA config and the compact weights)."""
    from peft import get_peft_model, set_peft_model_state_dict

    from .export import read_pilora_folder

    config, pcfg, state = read_pilora_folder(path)
    config.inference_mode = not is_trainable
    suffix = ".lora_B.dominant_mask"
    masks = {canonical_name(k[: -len(suffix)]): v.bool() for k, v in state.items() if k.endswith(suffix)}
    model = get_peft_model(base_model, config)
    to_pilora(model, masks, pcfg["supplementary_r"], pcfg["supplementary_alpha"])
    result = set_peft_model_state_dict(model, state)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"saved adapter has weights this model has no place for: {bad[:5]}")
    if not is_trainable:  # like peft.PeftModel.from_pretrained: frozen and in eval mode (no dropout)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model
