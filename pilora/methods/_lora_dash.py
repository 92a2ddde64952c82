"""LoRA-Dash's layers, launch and export; the method itself is :mod:`pilora.methods.lora_dash`,
which re-exports every name here (and loads this module, with torch and PEFT, on first use).

LoRA-Dash (Si et al., ICLR 2025, "Unleashing the Power of Task-Specific Directions in PEFT").

One training run in two phases, on top of a PEFT LoRA ``ΔW = s·B A``:

* **pre-launch** (``t`` forward calls of each layer, or ``t`` optimizer steps): plain LoRA;
* **launch**: for every target layer, ``W0 = U Σ Vᵀ`` (frozen weight, fp32) and
  the LoRA update projected on each singular pair, ``δ_i = u_iᵀ ΔW v_i``. The change rate
  ``|δ_i| / σ_i`` ranks W0's directions by how strongly the task moves them; the top ``s`` are the
  *task-specific directions* ``(U_s, V_s)``;
* **dash** (the remaining steps): LoRA keeps training, plus ``s`` learnable coefficients ``c``
  (zero at launch) that amplify those directions::

      h = W0 x + s·B A x + U_s diag(c) V_sᵀ x

What counts towards ``t`` (``method.prelaunch_counts``), as the authors' code does it
(github.com/Chongjie-Si/Subspace-Tuning @ 2c63d06, CR_MR/peft/src/peft/tuners/lora-dash.py,
``Linear.forward``):

* ``layer_calls`` (default, theirs): ``self.FLAG`` counts the layer's forward calls, eval forwards
  and the recomputation of gradient checkpointing included; the call that finds ``FLAG == warmup``
  (``warmup = 100``) selects the directions and already adds the dash term, so the coefficients get
  a gradient on that very step. Their scripts (CR_MR/scripts_for_CR/llama*.sh: batch = micro batch
  16, ``--use_gradient_checkpointing``) run two calls per optimizer step, so t = 100 calls launch
  after 50 optimizer steps, at the start of step 51.
* ``optimizer_steps``: the launch after optimizer step ``t`` (the paper's description), the
  coefficients training from step ``t + 1``: a count that does not move with gradient
  checkpointing or the evaluation schedule.

The dash branch draws its own dropout mask (theirs calls ``self.lora_dropout(x)`` again for it),
independent of the LoRA branch's.

The coefficients are the only new trainable parameters (``s`` per layer); ``U_s``, ``V_s`` are
frozen buffers saved with the adapter. PEFT's layer keeps its structure: the dash term is a PEFT
``LoraVariant`` (:class:`DashForward`) plus one ``lora_dash`` sub-module per adapter, so PEFT's
``merge`` / ``unmerge`` / ``merge_and_unload`` / ``save_pretrained`` and Trainer checkpoints work
unchanged. :func:`load_lora_dash` rebuilds a saved model, :func:`export_as_lora` writes the same
update as a stock PEFT LoRA of rank ``r + s``.
"""

from __future__ import annotations

import logging
import os

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from transformers import TrainerCallback

from ..peft_layers import PEFT_PREFIX, canonical_name, lora_layers
from .lora_dash import DASH_KEY, DIRECTIONS_FILE  # noqa: F401 (the method's light module)

log = logging.getLogger("pilora")


# ------------------------------------------------------------------------ direction selection


def change_rates(W: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rate, U, σ, Vh)`` with ``W = U diag(σ) Vh`` and ``rate_i = |u_iᵀ ΔW v_i| / σ_i``.

    Computed in at least fp32. A zero singular value is clamped at ``eps·σ_max`` so a direction
    that W does not use but ΔW does ranks first instead of producing ``inf``/``nan``.
    """
    dt = torch.promote_types(W.dtype, torch.float32)
    U, S, Vh = torch.linalg.svd(W.detach().to(dt), full_matrices=False)
    # diag(Uᵀ ΔW V) without forming the k×k product: δ_i = Σ_a U_ai (ΔW V)_ai
    proj = (U * (delta.detach().to(dt) @ Vh.T)).sum(0)
    floor = torch.finfo(dt).eps * (S[0] if S.numel() else 1.0)
    return proj.abs() / S.clamp_min(floor), U, S, Vh


def select_directions(W: torch.Tensor, delta: torch.Tensor, s: int):
    """The ``s`` task-specific directions of ``W`` for the update ``delta``.

    Returns ``(index, U_s (m×s), Vh_s (s×n), rate)``: singular-pair indices sorted by falling
    change rate ``|u_iᵀ ΔW v_i| / σ_i``, their left / right singular vectors, and all rates.
    """
    m, n = W.shape
    if not 0 < s <= min(m, n):
        raise ValueError(
            f"LoRA-Dash needs 0 < directions ≤ min(m, n) = {min(m, n)} for a {m}×{n} weight, "
            f"got {s}; lower method.directions"
        )
    rate, U, _, Vh = change_rates(W, delta)
    index = torch.topk(rate, s).indices
    return index, U[:, index], Vh[index], rate


# ------------------------------------------------------------------------------- the layer


class DashDirections(nn.Module):
    """The dash term of one layer: ``U_s diag(c) V_sᵀ`` (``c`` trainable, zero until trained).

    Buffers are persistent so that checkpoints and saved adapters carry the selection: a run resumed
    after the launch continues with the same directions, and a reloaded model equals the trained one.
    """

    def __init__(self, m: int, n: int, s: int, device=None, dtype=None, prelaunch_calls: int | None = None):
        super().__init__()
        # None: the launch comes from DashLaunchCallback after optimizer steps; an int t: this
        # layer launches itself on its forward call t + 1 (the authors' FLAG, see the module doc)
        self.prelaunch_calls = prelaunch_calls
        self.register_buffer("calls", torch.zeros((), dtype=torch.long, device=device))  # FLAG; saved for resume
        self.rate: list | None = None  # change rates of the chosen directions, once launched
        self.coefficients = nn.Parameter(torch.zeros(s, device=device, dtype=dtype))
        # zero until the launch: the dash term is then exactly 0 and c's gradient is 0
        self.register_buffer("directions_u", torch.zeros(m, s, device=device, dtype=dtype))
        self.register_buffer("directions_vh", torch.zeros(s, n, device=device, dtype=dtype))
        self.register_buffer("direction_index", torch.full((s,), -1, dtype=torch.long, device=device))

    @property
    def launched(self) -> bool:
        return bool((self.direction_index >= 0).all())

    def delta_weight(self) -> torch.Tensor:
        """``U_s diag(c) V_sᵀ`` (``m × n``)."""
        return (self.directions_u * self.coefficients) @ self.directions_vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.directions_vh.T) * self.coefficients) @ self.directions_u.T

    def extra_repr(self) -> str:
        m, s = self.directions_u.shape
        return f"rows={m}, cols={self.directions_vh.shape[1]}, directions={s}"


class DashForward(LoraVariant):
    """PEFT ``LoraVariant``: ``result + s·B A x̃₁ + U_s diag(c) V_sᵀ x̃₂`` with ``x̃₁``, ``x̃₂`` two
    independent dropout draws of ``x`` (the authors' forward calls ``self.lora_dropout(x)`` once per
    branch); merge adds the full update ``s·B A + U_s diag(c) V_sᵀ``. A layer that counts its calls
    (``prelaunch_counts=layer_calls``) launches itself here, as the authors' ``FLAG`` does."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:  # attached by attach_dash
        pass

    @staticmethod
    def delta(module, adapter: str) -> torch.Tensor:
        return module.get_delta_weight(adapter) + module.lora_dash[adapter].delta_weight()

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + DashForward.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += DashForward.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - DashForward.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dash = module.lora_dash[active_adapter]
        if dash.prelaunch_calls is not None and not dash.launched:
            if int(dash.calls) < dash.prelaunch_calls:
                dash.calls += 1  # FLAG += 1: a plain-LoRA call (training, eval or recomputation)
            else:  # FLAG == warmup: select now; this call already adds the dash term
                launch_layer(module, active_adapter)
                dash.calls += 1
        dropout = module.lora_dropout[active_adapter]
        lora = module.lora_B[active_adapter](module.lora_A[active_adapter](dropout(x))) * module.scaling[active_adapter]
        return result + lora + dash(dropout(x))


def attach_dash(
    layer: nn.Module, s: int, adapter_name: str = "default", name: str = "", prelaunch_calls: int | None = None
) -> None:
    """Give one PEFT ``lora.Linear`` its dash term (``s`` coefficients, directions set at launch).
    ``prelaunch_calls=t``: the layer launches itself on its forward call ``t + 1``; None: the
    launch is :func:`launch`'s (:class:`DashLaunchCallback` after optimizer steps)."""
    W = layer.get_base_layer().weight
    m, n = W.shape
    if not 0 < s <= min(m, n):
        raise ValueError(
            f"LoRA-Dash: method.directions={s} but layer {name or type(layer).__name__} is {m}×{n}, "
            f"which has only min(m, n) = {min(m, n)} singular directions; set method.directions "
            f"between 1 and {min(m, n)}"
        )
    if not hasattr(layer, DASH_KEY):
        layer.lora_dash = nn.ModuleDict()
        # PEFT's adapter bookkeeping (set_adapter, trainable flags, delete_adapter) then covers it too
        layer.adapter_layer_names = tuple(layer.adapter_layer_names) + (DASH_KEY,)
    A = layer.lora_A[adapter_name].weight
    layer.lora_dash[adapter_name] = DashDirections(
        m, n, s, device=A.device, dtype=A.dtype, prelaunch_calls=prelaunch_calls
    )
    layer.lora_variant[adapter_name] = DashForward()


def dash_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """LoRA layers of ``model`` that carry a dash term, keyed by base-model module name."""

    return {k: v for k, v in lora_layers(model, adapter_name).items() if adapter_name in getattr(v, DASH_KEY, {})}


def is_launched(model: nn.Module, adapter_name: str = "default") -> bool:
    layers = dash_layers(model, adapter_name)
    return bool(layers) and all(l.lora_dash[adapter_name].launched for l in layers.values())


@torch.no_grad()
def launch_layer(layer: nn.Module, adapter_name: str = "default", name: str = "") -> dict:
    """Select one layer's task-specific directions from its current LoRA update and write them into
    the layer (in place, so DDP and the optimizer keep their references)."""
    dash = layer.lora_dash[adapter_name]
    if layer.merged:
        raise RuntimeError(f"{name or 'layer'}: adapter is merged into the weight; unmerge before the launch")
    W = layer.get_base_layer().weight
    index, U_s, Vh_s, rate = select_directions(W, layer.get_delta_weight(adapter_name), dash.coefficients.numel())
    dash.directions_u.copy_(U_s)
    dash.directions_vh.copy_(Vh_s)
    dash.direction_index.copy_(index)
    dash.coefficients.zero_()  # the dash starts from the pre-launch model's output
    dash.rate = rate[index].tolist()
    return {"index": index.tolist(), "rate": dash.rate}


def launch(model: nn.Module, adapter_name: str = "default") -> dict[str, dict]:
    """End the pre-launch phase in every layer. Returns ``{module: {"index": [...], "rate": [...]}}``
    (rates of the chosen ones)."""
    return {name: launch_layer(layer, adapter_name, name) for name, layer in dash_layers(model, adapter_name).items()}


# ------------------------------------------------------------------------------ the runner


class DashLaunchCallback(TrainerCallback):
    """Runs the launch inside one Trainer run, after optimizer step ``prelaunch_steps``; when the
    layers count their own calls (``prelaunch_counts=layer_calls``) it records the step in which they
    launched instead.

    Before a layer's launch its coefficients' gradients (exactly 0: the directions are still zero) are
    dropped before ``optimizer.step``, so AdamW neither decays nor counts steps for them and they
    start the dash phase with fresh moments, as parameters that joined the run at the launch would.
    The dash term stays in the graph throughout, so DDP sees the same parameters used every step.
    """

    def __init__(
        self, model: nn.Module, prelaunch_steps: int, directions_file: str | None = None, adapter_name: str = "default"
    ):
        self.model, self.t, self.file, self.adapter = model, int(prelaunch_steps), directions_file, adapter_name
        self.launch_step = None
        self.chosen: dict | None = None

    @property
    def counts_calls(self) -> bool:
        return any(
            l.lora_dash[self.adapter].prelaunch_calls is not None
            for l in dash_layers(self.model, self.adapter).values()
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if self.counts_calls:  # calls per optimizer step: micro-batches, twice under activation checkpointing
            per_step = int(args.gradient_accumulation_steps) * (2 if args.activation_checkpointing else 1)
            check_prelaunch(self.t, state.max_steps * per_step, unit="forward calls of each layer in training")
        else:
            check_prelaunch(self.t, state.max_steps)
        refuse_sharded_launch(args)
        if is_launched(self.model, self.adapter):  # resumed from a checkpoint written after the launch
            # the launch's own record: with layer_calls the step is not t (t counts forward calls)
            saved = torch.load(self.file, weights_only=True) if self.file and os.path.isfile(self.file) else None
            self.launch_step = saved["step"] if saved else self.t
            self.chosen = saved["modules"] if saved else self._from_layers()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.launch_step is None:
            for layer in dash_layers(self.model, self.adapter).values():
                dash = layer.lora_dash[self.adapter]
                if not dash.launched:  # a layer launched in this step's forward keeps its gradient
                    dash.coefficients.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.launch_step is not None:
            return
        if self.counts_calls:
            if not is_launched(self.model, self.adapter):
                return
            self.chosen = {
                k: {"index": l.lora_dash[self.adapter].direction_index.tolist(), "rate": l.lora_dash[self.adapter].rate}
                for k, l in dash_layers(self.model, self.adapter).items()
            }
        elif state.global_step >= self.t:
            self.chosen = launch(self.model, self.adapter)
        else:
            return
        from ..distributed import check_ranks_agree, is_main

        self.launch_step = state.global_step
        # every rank selects from identical (all-reduced) LoRA weights; verify it
        check_ranks_agree({k: torch.tensor(v["index"]) for k, v in self.chosen.items()})
        log.info(
            "LoRA-Dash launch at step %d: %d directions in each of %d layers",
            state.global_step,
            len(next(iter(self.chosen.values()))["index"]) if self.chosen else 0,
            len(self.chosen),
        )
        if self.file and is_main():
            torch.save({"step": state.global_step, "modules": self.chosen}, self.file)

    def _from_layers(self) -> dict:
        return {
            k: {"index": l.lora_dash[self.adapter].direction_index.tolist()}
            for k, l in dash_layers(self.model, self.adapter).items()
        }

    def summary(self) -> dict:
        """The record's ``lora_dash`` entry."""
        return {
            "prelaunch_steps": self.t,
            "prelaunch_counts": "layer_calls" if self.counts_calls else "optimizer_steps",
            "launch_step": self.launch_step,
            "directions": {k: v["index"] for k, v in (self.chosen or {}).items()},
            "directions_file": self.file if self.file and os.path.exists(self.file) else None,
        }


def check_prelaunch(prelaunch_steps: int, total_steps: int, unit: str = "optimizer steps") -> None:
    """The pre-launch phase must end before the run does, or there is no dash phase."""
    if prelaunch_steps >= total_steps:
        raise ValueError(
            f"LoRA-Dash pre-launch (method.prelaunch_steps={prelaunch_steps}) is not shorter than "
            f"the training run ({total_steps} {unit}), so the dash phase would never run. "
            "Lower method.prelaunch_steps or train longer (trainer.num_train_epochs / trainer.max_steps)."
        )


def refuse_sharded_launch(args) -> None:
    """The launch takes the SVD of every full frozen ``W0`` and reads the full ``A``, ``B``: FSDP shards them."""
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ValueError(
            "LoRA-Dash's launch needs every layer's full weight W0 and LoRA A, B on each rank "
            "(an SVD per layer), but FSDP shards them (trainer.fsdp / ACCELERATE_USE_FSDP). "
            "Run LoRA-Dash with DDP: drop trainer.fsdp."
        )


# ------------------------------------------------------------------------- save / load / export


def load_lora_dash(base_model: nn.Module, path: str, is_trainable: bool = False) -> nn.Module:
    """Rebuild a LoRA-Dash model saved with ``save_pretrained``: the number of directions comes from
    the saved coefficients, the directions themselves from the saved buffers."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "adapter_model.safetensors"))
    suffix = f".{DASH_KEY}.coefficients"
    sizes = {canonical_name(k[: -len(suffix)]): v.numel() for k, v in state.items() if k.endswith(suffix)}
    if not sizes:
        raise ValueError(
            f"{path!r} holds no LoRA-Dash coefficients (*{suffix}): not a LoRA-Dash adapter "
            "(a plain LoRA loads with peft.PeftModel.from_pretrained)"
        )
    config = LoraConfig.from_pretrained(path)
    config.inference_mode = not is_trainable
    model = get_peft_model(base_model, config)
    for name, layer in lora_layers(model).items():
        if name not in sizes:
            raise ValueError(f"saved adapter has no LoRA-Dash coefficients for layer {name}")
        attach_dash(layer, sizes[name], name=name)
    result = set_peft_model_state_dict(model, state)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"saved adapter has weights this model has no place for: {bad[:5]}")
    if not is_trainable:  # like peft.PeftModel.from_pretrained: frozen, eval mode
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def export_as_lora(peft_model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Write a stock PEFT LoRA of rank ``r + s`` with the same update:
    ``A = [A; V_sᵀ]``, ``B = [s·B, U_s diag(c)]``, ``lora_alpha = r + s`` (scaling 1)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = peft_model.peft_config[adapter_name]
    state, rank = {}, None
    for name, layer in dash_layers(peft_model, adapter_name).items():
        dash = layer.lora_dash[adapter_name]
        A = torch.cat([layer.lora_A[adapter_name].weight, dash.directions_vh]).detach()
        B = torch.cat(
            [layer.lora_B[adapter_name].weight * layer.scaling[adapter_name], dash.directions_u * dash.coefficients],
            dim=1,
        ).detach()
        if rank is not None and A.shape[0] != rank:
            raise ValueError("export needs one rank r + s for all layers")
        rank = A.shape[0]
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
    for key, value in peft_model.state_dict().items():  # heads trained in full travel as they are
        if ".modules_to_save." in key and f".{adapter_name}." in key:
            state[key.replace(f".modules_to_save.{adapter_name}", "")] = value.detach().contiguous().cpu()
    LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=cfg.target_modules,
        lora_dropout=cfg.lora_dropout,
        modules_to_save=cfg.modules_to_save,
        task_type=cfg.task_type,
        base_model_name_or_path=cfg.base_model_name_or_path,
    ).save_pretrained(path)
    save_file(state, os.path.join(path, "adapter_model.safetensors"))
