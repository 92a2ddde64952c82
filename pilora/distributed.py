"""Multi-process runs (DDP via torchrun / accelerate): who this process is, per-rank logs, and the
checks that stage 1 is run where it can be (no FSDP) and gave every rank the same partition."""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from .importance import ImportanceStats

log = logging.getLogger("pilora")


def rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's RANK."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def refuse_sharded_stage1(args) -> None:
    """Stage 1 reads the full LoRA gradients ``∂A``, ``∂B`` of every layer (Eq. 7): FSDP shards them
    across ranks, so each rank would score its own shard only. Refuse it with the way out."""
    accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if getattr(args, "fsdp", None) or accelerate_fsdp:
        raise ValueError(
            "PiLoRA stage 1 needs full (unsharded) LoRA gradients, but FSDP is enabled "
            f"({'trainer.fsdp' if getattr(args, 'fsdp', None) else 'ACCELERATE_USE_FSDP'}). Run stage 1 with "
            "DDP (drop trainer.fsdp), or take the statistics of such a run with "
            "method.importance_from=<dir>/importance.pt and use FSDP for stage 2 only."
        )


class DistributedMismatch(RuntimeError):
    """Ranks of one DDP job ended stage 1 with different statistics or partitions."""


def _digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        k: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        for k, t in sorted(tensors.items())
    }


def check_ranks_agree(masks: dict[str, torch.Tensor], stats: ImportanceStats | None = None) -> None:
    """All-gather a per-module hash of the partition masks (and of the hit counts ``H``) and raise
    :class:`DistributedMismatch`, naming the modules, if any rank differs from rank 0.

    Stage 1 scores the gradients after DDP's all-reduce, so the ranks should agree bit for bit;
    this verifies it instead of trusting it. A no-op outside torch.distributed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {"masks": _digest(masks)}
    if stats is not None:
        mine["hits"] = _digest({k: s.hits for k, s in stats.modules.items()})
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    ref = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        for part in ("masks", "hits"):
            diff = sorted(
                k
                for k in set(ref.get(part, {})) | set(other.get(part, {}))
                if ref.get(part, {}).get(k) != other.get(part, {}).get(k)
            )
            if diff:
                raise DistributedMismatch(
                    f"stage-1 {part} differ between rank 0 and rank {rank} in {len(diff)} module(s), "
                    f"e.g. {diff[:3]}: the ranks did not see identical (all-reduced) LoRA gradients. "
                    "Check that every rank runs the same code, config and seed, and that the gradients "
                    "are all-reduced before the importance pass (DDP, not FSDP or per-rank training)."
                )
    log.info("stage-1 partitions agree across %d ranks", len(gathered))
