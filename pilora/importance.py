"""Stage 1 of PiLoRA: gradient-informed neuron importance (paper Sec. 3.2, Alg. 1 lines 3-13).

Every target layer carries a plain LoRA ``ΔW = s·B A``. After the gradients of a step are final
(after accumulation, all-reduce and clipping, before ``optimizer.step``) and every ``K`` steps:

* ``G̃ = s·(B Gᴬ + Gᴮ A)``                    (Eq. 7, times the LoRA scaling ``s``),
* ``S_i = Σ_j |G̃_ij|``                         (Eq. 8 / Alg. 1 line 9),
* ``H_i += 1`` where ``S_i > mean(S)``         (Alg. 1 line 11),

and the running ``ΣS``, the number of checks ``T`` and a down-sampled ``Σ|G̃|`` (for the heat-map
figures) are kept. ``G̃`` is formed in fp32, one module at a time and ``chunk_rows`` rows at a time,
so the extra memory is one ``chunk_rows × n`` block, never ``m × n`` per layer.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .records import umask_mode

STATS_FORMAT = 1


def approx_full_grad(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                     scaling: float = 1.0) -> torch.Tensor:
    """The approximate full-weight gradient ``G̃ = s·(B Gᴬ + Gᴮ A)`` of Eq. 7 (dense, ``m × n``).

    Meant for tests and small layers; :func:`row_scores` computes the same thing chunk-wise.
    """
    dt = torch.promote_types(B.dtype, torch.float32)  # at least fp32; float64 stays float64
    return scaling * (B.to(dt) @ grad_A.to(dt) + grad_B.to(dt) @ A.to(dt))


def _grad_chunks(A, B, grad_A, grad_B, scaling, chunk_rows) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, G̃[rows])`` blocks in fp32, all written into ONE reused buffer, so no more
    than ``chunk_rows × n`` is alive. Each block is overwritten by the next: consume it first."""
    A32, gA32 = A.float(), grad_A.float()
    m = B.shape[0]
    buf = torch.empty(min(chunk_rows, m), A.shape[1], dtype=torch.float32, device=B.device)
    for start in range(0, m, chunk_rows):
        rows = slice(start, min(start + chunk_rows, m))
        block = buf[: rows.stop - rows.start]
        torch.mm(B[rows].float(), gA32, out=block)
        block.addmm_(grad_B[rows].float(), A32)
        yield rows, block.mul_(scaling)


def row_scores(A, B, grad_A, grad_B, scaling: float = 1.0, chunk_rows: int = 1024,
               snapshot: torch.Tensor | None = None) -> torch.Tensor:
    """Row importance ``S_i = Σ_j |G̃_ij|`` (Eq. 8), computed in row chunks.

    If ``snapshot`` (a ``gm × gn`` fp32 tensor) is given, ``|G̃|`` average-pooled onto that grid is
    added into it, so the heat maps of Fig. 2/7/8 can be drawn without keeping ``G̃``.
    """
    m, n = B.shape[0], A.shape[1]
    scores = torch.empty(m, dtype=torch.float32, device=B.device)
    if snapshot is not None:
        gm, gn = snapshot.shape
        row_bin = torch.arange(m, device=B.device) * gm // m
        rows_per_bin = torch.bincount(row_bin, minlength=gm).float()
    for rows, block in _grad_chunks(A, B, grad_A, grad_B, scaling, chunk_rows):
        block.abs_()
        scores[rows] = block.sum(dim=1)
        if snapshot is not None:
            pooled = F.adaptive_avg_pool1d(block.unsqueeze(0), gn).squeeze(0)  # rows × gn
            bins = row_bin[rows]
            # each grid cell holds the mean |G̃| over its rows and columns
            snapshot.index_add_(0, bins, pooled / rows_per_bin[bins, None])
    return scores


@dataclass
class ModuleStats:
    """Stage-1 statistics of one ``m × n`` target layer."""

    shape: tuple[int, int]
    hits: torch.Tensor            # H, int64 (m,)
    score_sum: torch.Tensor       # ΣS over checks, float64 (m,)
    checks: int = 0               # T
    grad_snapshot: torch.Tensor | None = None  # Σ|G̃| pooled to a small grid, float32

    @classmethod
    def empty(cls, m: int, n: int, snapshot_shape: tuple[int, int] | None = (64, 64)) -> "ModuleStats":
        snap = None
        if snapshot_shape is not None:
            snap = torch.zeros(min(m, snapshot_shape[0]), min(n, snapshot_shape[1]))
        return cls((m, n), torch.zeros(m, dtype=torch.int64), torch.zeros(m, dtype=torch.float64), 0, snap)

    def update(self, scores: torch.Tensor) -> None:
        """Alg. 1 lines 10-12: one check with row scores ``S``."""
        scores = scores.detach().to("cpu", torch.float64)
        self.hits += (scores > scores.mean()).to(torch.int64)
        self.score_sum += scores
        self.checks += 1


@dataclass
class ImportanceStats:
    """Stage-1 statistics of every target layer: the artifact stage 2 and the figures read."""

    modules: dict[str, ModuleStats] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename), so an interrupted save never leaves a torn file."""
        payload = {
            "format": STATS_FORMAT,
            "meta": self.meta,
            "modules": {name: {"shape": list(s.shape), "hits": s.hits, "score_sum": s.score_sum,
                               "checks": s.checks, "grad_snapshot": s.grad_snapshot}
                        for name, s in self.modules.items()},
        }
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.fchmod(fd, umask_mode())  # mkstemp makes 0600; a group on a shared disk may read results
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceStats":
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"importance statistics not found at {path!r}: point method.importance_from at the "
                "importance.pt written by a stage-1 run, or drop it to run stage 1")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file
            raise ValueError(f"{path!r} is not a readable importance-statistics file ({err}); delete it and "
                             "re-run stage 1 (rerun the job that wrote it), or point method.importance_from at "
                             "another file") from err
        if not isinstance(payload, dict):
            raise ValueError(f"{path!r} holds a {type(payload).__name__}, not importance statistics (a dict "
                             "written by a PiLoRA stage 1); point method.importance_from at a stage-1 importance.pt")
        if payload.get("format") != STATS_FORMAT or not isinstance(payload.get("modules"), dict):
            raise ValueError(f"{path!r} has importance-statistics format {payload.get('format')!r}, "
                             f"this code reads format {STATS_FORMAT}; delete it and rerun the job that wrote it "
                             "(its stage 1 runs again)")
        try:
            modules = {name: ModuleStats(tuple(d["shape"]), d["hits"], d["score_sum"], int(d["checks"]),
                                         d.get("grad_snapshot"))
                       for name, d in payload["modules"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path!r} has damaged module statistics ({type(err).__name__}: {err}); delete it "
                             "and rerun the job that wrote it (its stage 1 runs again)") from err
        return cls(modules, payload.get("meta", {}))

    def check_matches(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Raise a clear error when these statistics were not made for a model with ``shapes``."""
        missing = sorted(set(shapes) - set(self.modules))
        extra = sorted(set(self.modules) - set(shapes))
        wrong = [f"{k}: stats {self.modules[k].shape} vs model {tuple(shapes[k])}"
                 for k in sorted(set(shapes) & set(self.modules)) if tuple(self.modules[k].shape) != tuple(shapes[k])]
        if missing or extra or wrong:
            lines = []
            if missing:
                lines.append(f"modules without statistics: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                lines.append(f"statistics for modules the model lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            if wrong:
                lines.append("shape mismatches: " + "; ".join(wrong[:5]))
            raise ValueError("importance statistics do not match this model (" + " | ".join(lines) + "). "
                             "Use statistics from a stage-1 run with the same model and target_modules, "
                             "or drop method.importance_from to recompute them.")


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """PEFT LoRA linear layers of ``model`` that carry ``adapter_name``, keyed by base-model name."""
    from peft.tuners.lora import Linear as LoraLinear

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            found[canonical_name(name)] = module
    return found


PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """Strip PEFT's wrapper prefix so statistics key on the base model's module names."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


class ImportanceAccumulator:
    """Accumulates ``H``, ``ΣS`` and ``T`` over the LoRA layers of a model (Alg. 1 lines 4-12).

    Call :meth:`step` once per optimizer step, after gradients are final and before the
    optimizer updates ``A`` and ``B`` (``attach`` registers an optimizer pre-hook that does
    this; with ``transformers.Trainer`` use :class:`ImportanceCallback`).
    """

    def __init__(self, model: nn.Module, interval: int = 10, chunk_rows: int = 1024,
                 adapter_name: str = "default", snapshot_shape: tuple[int, int] | None = (64, 64),
                 stats: ImportanceStats | None = None):
        if interval < 1:
            raise ValueError(f"importance interval K must be ≥ 1, got {interval}")
        self.layers = lora_layers(model, adapter_name)
        if not self.layers:
            raise ValueError("no LoRA layers found: apply a LoRA adapter (pilora.prepare_model) before "
                             "creating the importance accumulator")
        self.adapter_name, self.interval, self.chunk_rows = adapter_name, interval, chunk_rows
        shapes = {k: tuple(l.get_base_layer().weight.shape) for k, l in self.layers.items()}
        if stats is None:
            stats = ImportanceStats({k: ModuleStats.empty(*s, snapshot_shape=snapshot_shape)
                                     for k, s in shapes.items()})
        else:
            stats.check_matches(shapes)
        self.stats = stats
        self.steps_seen = 0

    @torch.no_grad()
    def update(self) -> None:
        """One importance check over every layer (one module at a time, fp32, row chunks)."""
        a = self.adapter_name
        for name, layer in self.layers.items():
            A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
            if A.grad is None or B.grad is None:
                continue  # layer not reached by this batch's loss
            mstats = self.stats.modules[name]
            if mstats.grad_snapshot is not None and mstats.grad_snapshot.device != B.device:
                mstats.grad_snapshot = mstats.grad_snapshot.to(B.device)
            scores = row_scores(A, B, A.grad, B.grad, float(layer.scaling[a]), self.chunk_rows,
                                mstats.grad_snapshot)
            mstats.update(scores)

    def step(self, global_step: int | None = None) -> bool:
        """Run a check if this optimizer step is a multiple of ``K``; return whether it ran."""
        t = self.steps_seen if global_step is None else global_step
        self.steps_seen = t + 1
        if t % self.interval == 0:
            self.update()
            return True
        return False

    def attach(self, optimizer: torch.optim.Optimizer):
        """Check before every ``optimizer.step`` of a hand-written loop; returns the hook handle."""
        def hook(*_):
            self.step()  # a pre-hook must return None
        return optimizer.register_step_pre_hook(hook)

    def finalize(self) -> ImportanceStats:
        for s in self.stats.modules.values():
            if s.grad_snapshot is not None:
                s.grad_snapshot = s.grad_snapshot.cpu()
        return self.stats
