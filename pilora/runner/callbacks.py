"""The runner's ``transformers.Trainer`` callbacks: a NaN-loss guard and a first-step marker."""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint


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
