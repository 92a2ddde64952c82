"""``transformers.Trainer`` callbacks: the stage-1 importance pass and a NaN-loss guard."""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback
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

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
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
            raise FileNotFoundError(f"checkpoint {checkpoint!r} has no {STATS_IN_CHECKPOINT}: it was not "
                                    "written by a stage-1 run; delete it to restart stage 1")
        return ImportanceStats.load(path)


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
                "(the run resumes from that checkpoint).")
