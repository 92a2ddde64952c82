"""``transformers.Trainer`` callbacks of the method: the stage-1 importance pass (Alg. 1 lines 7-12)."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from .importance import ImportanceAccumulator, ImportanceStats

STATS_IN_CHECKPOINT = "importance_stats.pt"

log = logging.getLogger("pilora")


class ImportanceCallback(TrainerCallback):
    """Runs :class:`ImportanceAccumulator` at Trainer's pre-optimizer-step point, i.e. after
    gradient accumulation, DDP all-reduce and clipping, before ``optimizer.step`` (Alg. 1 line 7).

    The statistics are part of every checkpoint (``importance_stats.pt``), so a resumed stage 1
    continues the same ``H``, ``ΣS`` and ``T``. Under a loss scaler (fp16 on a GPU) a check whose
    gradients overflowed is skipped with the update the scaler skips.
    """

    def __init__(self, accumulator: ImportanceAccumulator):
        self.accumulator = accumulator
        self._checked = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._checked:
            check_full_lora_gradients(self.accumulator)
            self._checked = True
        # accelerate's optimizer holds the GradScaler when one runs (fp16 on a GPU; None otherwise)
        optimizer = kwargs.get("optimizer")
        scaled = getattr(optimizer, "scaler", None) is not None
        # the scaler skips the update when any gradient it unscaled overflowed (a head's too)
        params = [p for group in optimizer.param_groups for p in group["params"]] if scaled else None
        before = len(self.accumulator.skipped_checks)
        self.accumulator.step(state.global_step, skip_nonfinite=scaled, params=params)
        if len(self.accumulator.skipped_checks) > before:
            log.warning(
                "PiLoRA stage 1: the importance check of step %d is skipped: the fp16 gradients "
                "overflowed and the loss scaler skips this update (%d checks skipped so far)",
                state.global_step,
                before + 1,
            )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(ckpt):
                self.accumulator.stats.save(os.path.join(ckpt, STATS_IN_CHECKPOINT))

    @staticmethod
    def stats_from_checkpoint(checkpoint: str) -> ImportanceStats:
        path = os.path.join(checkpoint, STATS_IN_CHECKPOINT)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"checkpoint {checkpoint!r} has no {STATS_IN_CHECKPOINT}: it was not "
                "written by a stage-1 run; delete it to restart stage 1"
            )
        return ImportanceStats.load(path)


class ShardedGradients(RuntimeError):
    """The LoRA parameters (hence gradients) are sharded across ranks (FSDP): stage 1 cannot score them."""


def check_full_lora_gradients(accumulator: ImportanceAccumulator) -> None:
    """Raise :class:`ShardedGradients` if any LoRA ``A``/``B`` is a sharded DTensor (FSDP2) or its
    gradient does not have the parameter's full shape (FSDP1 flat parameters): the importance pass
    of Eq. 7 needs every rank to see the full, all-reduced ``∂A`` and ``∂B``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        DTensor = ()
    a = accumulator.adapter_name
    for name, layer in accumulator.layers.items():
        for part in ("lora_A", "lora_B"):
            w = getattr(layer, part)[a].weight
            grad = w.grad
            if (
                isinstance(w, DTensor)
                or isinstance(grad, DTensor)
                or w.numel() == 0
                or (grad is not None and tuple(grad.shape) != tuple(w.shape))
            ):
                raise ShardedGradients(
                    f"{name}.{part} is sharded across ranks (parameter {type(w).__name__} {tuple(w.shape)}, "
                    f"gradient {None if grad is None else tuple(grad.shape)}): PiLoRA stage 1 needs the full "
                    "LoRA gradients. Run stage 1 with DDP (no trainer.fsdp) and pass its importance.pt to "
                    "an FSDP stage 2 with method.importance_from=..."
                )
