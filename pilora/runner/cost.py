"""The cost of a job (wall time per stage, total, peak memory), carried across the segments of a
job that was preempted and rerun, so that a resumed job records what an uninterrupted one would.

The clock's state is written into every checkpoint (``pilora_cost.json``) and, at the end of stage
1, into ``importance.pt``; resuming from either restores it. Work done after the last checkpoint
of a killed segment is done again after resuming and is counted once, as in an uninterrupted run;
the repeated start-up of a rerun (imports, data, model build) is not counted.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch
from transformers import TrainerCallback

from .records import atomic_write_json

COST_IN_CHECKPOINT = "pilora_cost.json"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class JobClock:
    """Seconds since the job began, summed over its segments, and the peak memory of any segment."""

    def __init__(self):
        self.base, self.mark, self.prior_peak = 0.0, time.time(), 0.0
        self.stages: dict[str, float] = {}  # finished stages: seconds
        self.started: dict[str, float] = {}  # job seconds at which a stage began

    def elapsed(self) -> float:
        return self.base + time.time() - self.mark

    def peak(self) -> float:
        return max(self.prior_peak, peak_memory_mb())

    def start(self, stage: str) -> None:
        self.started[stage] = self.elapsed()

    def stop(self, stage: str) -> float:
        self.stages[stage] = self.elapsed() - self.started[stage]
        return self.stages[stage]

    def state(self) -> dict:
        return {
            "job_s": self.elapsed(),
            "stages": dict(self.stages),
            "started": dict(self.started),
            "peak_memory_mb": self.peak(),
        }

    def restore(self, saved: dict | None) -> None:
        """Continue from a saved state: the time of this segment so far (start-up) is not counted."""
        if not saved:
            return
        self.base, self.mark = float(saved["job_s"]), time.time()
        self.stages.update(saved.get("stages", {}))
        self.started.update(saved.get("started", {}))
        self.prior_peak = max(self.prior_peak, float(saved.get("peak_memory_mb", 0.0)))

    def restore_from_checkpoint(self, ckpt: str) -> None:
        try:
            with open(os.path.join(ckpt, COST_IN_CHECKPOINT)) as f:
                self.restore(json.load(f))
        except FileNotFoundError:
            pass


class CostCallback(TrainerCallback):
    """Writes the clock into each checkpoint, next to the weights it belongs to."""

    def __init__(self, clock: JobClock):
        self.clock = clock

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(ckpt):
                # no fsync: the checkpoint next to it is not fsynced either (Trainer writes it plainly)
                atomic_write_json(os.path.join(ckpt, COST_IN_CHECKPOINT), self.clock.state(), indent=None, fsync=False)
