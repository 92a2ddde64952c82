"""What a job shows: progress bars named after their stage, metric lines in ``run.log``, and
one log file per rank under a launcher."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..distributed import rank


def per_rank_log_file(out: str) -> None:
    """Under a launcher every rank runs Hydra with the same run dir; rank k > 0 logs to
    ``run.rank<k>.log`` instead of also writing (and clobbering) rank 0's ``run.log``."""
    me = rank()
    if me == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and os.path.dirname(os.path.abspath(h.baseFilename)) == out:
            stem, ext = os.path.splitext(h.baseFilename)
            new = logging.FileHandler(f"{stem}.rank{me}{ext}", mode="w")
            new.setFormatter(h.formatter)
            new.setLevel(h.level)
            root.removeHandler(h)
            h.close()
            root.addHandler(new)


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

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Nothing: :class:`MetricsToLog` prints each metric line once, through the ``pilora``
        logger (console and ``run.log``); ProgressCallback would write the same dict again."""


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
