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


def fsdp_requested(args) -> bool:
    """Whether the job asked for FSDP: ``trainer.fsdp`` or an ``accelerate launch`` FSDP config."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def refuse_unsharded_fsdp(args, distributed_type) -> None:
    """Raise a ValueError when FSDP was asked for but accelerate prepared something else.

    accelerate (1.x) turns the FSDP plugin into ``DistributedType.FSDP`` only on accelerator ranks
    (GPU, XPU, NPU, ...); CPU ranks (gloo) become ``MULTI_CPU`` and the Trainer wraps the model in
    DDP without a word (a single process without a launcher is refused by transformers itself). The
    job would then train unsharded, and a 7B full fine-tune would fail later on memory, not here."""
    if not fsdp_requested(args):
        return
    kind = getattr(distributed_type, "value", distributed_type)
    if str(kind).upper() != "FSDP":
        raise ValueError(
            f"trainer.fsdp is set, but accelerate prepared this job as {kind!r}, not FSDP: it shards "
            "only on GPU (or other accelerator) ranks started by torchrun / accelerate launch, and "
            "CPU ranks or a single process without a launcher would silently train unsharded. Launch on "
            "GPUs (e.g. torchrun --nproc_per_node 8 run.py ... +trainer.fsdp=true), or drop trainer.fsdp."
        )


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_full_model(model: torch.nn.Module, build) -> torch.nn.Module:
    """An unsharded copy of an FSDP2-sharded ``model`` on every rank; ``model`` itself when it is
    not sharded. ``build()`` makes a fresh model of the same structure (the runner's
    ``prepare_model(task.build_model(), ...)``); its parameters receive the all-gathered full
    tensors (``DTensor.full_tensor``, a collective every rank joins in the same order) and its
    buffers the replicated ones. Parameters are copied directly rather than through the state
    dict, so layers with their own state-dict format (PiLoRA's compact blocks) need no DTensor
    support. The copy lives on the shards' device: the full model, once per rank."""
    from torch.distributed.tensor import DTensor

    if not is_sharded(model):
        return model
    with torch.random.fork_rng(devices=[]):  # building draws initial values; the job's stream goes on
        fresh = build()
    mine, theirs = dict(model.named_parameters()), dict(fresh.named_parameters())
    if mine.keys() != theirs.keys():
        raise RuntimeError(
            "gathering the FSDP shards: the rebuilt model's parameters differ from the trained one's "
            f"(only trained: {sorted(mine.keys() - theirs.keys())[:3]}, only rebuilt: "
            f"{sorted(theirs.keys() - mine.keys())[:3]})"
        )
    device = next(p.to_local() if isinstance(p, DTensor) else p for p in mine.values()).device
    fresh.to(device)
    with torch.no_grad():
        for name, p in mine.items():
            theirs[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
        buffers = dict(fresh.named_buffers())
        for name, b in model.named_buffers():
            if name in buffers:
                buffers[name].copy_(b.full_tensor() if isinstance(b, DTensor) else b)
    from .export import carry_initial_adapter

    carry_initial_adapter(model, fresh)  # PiSSA / MiLoRA: the copy saves converted, as the trained model would
    return fresh.train(model.training)
