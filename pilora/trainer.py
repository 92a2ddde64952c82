"""``transformers.Trainer`` with PiLoRA's structural zeros held once per step.

:class:`PiLoRATrainer` is ``transformers.Trainer`` plus one call: during ``train()`` the PiLoRA
layers of the model run without their per-forward product ``blocks ⊙ P`` and a
:class:`~pilora.layer.StepGradientMask` zeroes the structural zeros' gradients after every
backward, i.e. before the Trainer clips the gradients and steps the optimizer. Every other model
(LoRA, the baselines, stage 1) trains exactly as with ``transformers.Trainer``.
"""

from __future__ import annotations

from transformers import Trainer

from .io import follow_umask
from .layer import StepGradientMask


def _sharded(trainer: Trainer) -> bool:
    """Whether DeepSpeed / FSDP own the gradients (flattened or sharded: no per-layer ``.grad``)."""
    from accelerate.utils import DistributedType

    return trainer.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


class PiLoRATrainer(Trainer):
    grad_mask: StepGradientMask | None = None

    def train(self, *args, **kwargs):
        # Installed for train() only: outside it (evaluation, a user's own loop) the layers keep the
        # product, which needs no call. Under DeepSpeed / FSDP they keep it during train() too.
        if not _sharded(self):
            self.grad_mask = StepGradientMask(self.model) or None
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.grad_mask is not None:
                self.grad_mask.remove()
                self.grad_mask = None

    def _save(self, output_dir=None, state_dict=None):
        # checkpoints and save_model: safetensors writes 0600, the rest of the folder follows the umask
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # the process that wrote the files (under FSDP every rank passes here)
            follow_umask(output_dir or self.args.output_dir)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # after this micro-batch's backward (and, on a sync step, DDP's all-reduce): the gradients the
        # Trainer clips and the optimizer steps on are those of Eq. 10 (masking is linear, so masking
        # each micro-batch's accumulation equals masking their sum)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.grad_mask is not None:
            self.grad_mask()
        return loss
