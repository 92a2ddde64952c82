"""``transformers.Trainer`` callbacks: the stage-1 importance pass and a NaN-loss guard."""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .importance import ImportanceAccumulator, ImportanceStats

STATS_IN_CHECKPOINT = "importance_stats.pt"


class ImportanceCallback(TrainerCallback):
    """Runs :class:`ImportanceAccumulator` at Trainer's pre-optimizer-step point, i.e. after
    gradient accumulation, DDP all-reduce and clipping, before ``optimizer.step`` (Alg. 1 line 7).

    The statistics are part of every checkpoint (``importance_stats.pt``), so a resumed stage 1
    continues the same ``H``, ``ΣS`` and ``T``.
    """

    def __init__(self, accumulator: ImportanceAccumulator):
        self.accumulator = accumulator
        self._checked = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._checked:
            check_full_lora_gradients(self.accumulator)
            self._checked = True
        self.accumulator.step(state.global_step)

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


class TrainingDiverged(RuntimeError):
    pass


class NanLossGuard(TrainerCallback):
    """Stop at the first logged non-finite loss, naming the step and the last good checkpoint."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            raise TrainingDiverged(
                f"loss became {loss} at step {state.global_step}; last good checkpoint: {last or 'none'}. "
                "Lower trainer.learning_rate or enable gradient clipping (trainer.max_grad_norm), then rerun "
                "(the run resumes from that checkpoint)."
            )


class FirstStep(TrainerCallback):
    """Marks the first optimizer step of ``Trainer.train``: an error raised before it comes from
    loading the checkpoint being resumed, not from training."""

    started = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = True


STAGE_NAMES = {"stage1": "stage 1 (importance)", "stage2": "stage 2", "train": "train"}


def stage_label(output_dir: str) -> str:
    """A stage's Trainer output folder (``stage1``, ``stage2`` or ``train``) -> its console name."""
    base = os.path.basename(os.path.normpath(output_dir))
    return STAGE_NAMES.get(base, base)


class StageProgress(ProgressCallback):
    """Trainer's progress bars, named after the stage they count (two-stage jobs show two bars)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.stage)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        new = self.prediction_bar is None
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if new and self.prediction_bar is not None:
            self.prediction_bar.set_description(f"{self.stage} eval")


class MetricsToLog(TrainerCallback):
    """Every metric line Trainer logs goes to the ``pilora`` logger too, so ``run.log`` holds the
    losses and evaluations and not only the job's milestones."""

    def __init__(self, stage: str):
        self.stage = stage
        self.log = __import__("logging").getLogger("pilora")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            self.log.info("%s step %d: %s", self.stage, state.global_step, shown)
