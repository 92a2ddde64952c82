"""Stage 1 of PiLoRA: gradient-informed neuron importance (paper Sec. 3.2, Alg. 1 lines 3-13).

Every target layer carries a plain LoRA ``ΔW = s·B A``. After the gradients of a step are final
(after accumulation, all-reduce and clipping, before ``optimizer.step``) and every ``K`` steps:

* ``G̃ = s·(B Gᴬ + Gᴮ A)``                    (Eq. 7, times the LoRA scaling ``s``),
* ``S_i = Σ_j |G̃_ij|``                         (Eq. 8 / Alg. 1 line 9),
* ``H_i += 1`` where ``S_i > mean(S)``         (Alg. 1 line 11),

and the running ``ΣS``, the number of checks ``T`` and a small ``Σ|G̃|`` grid (the heat-map
snapshot of the figures: a full-resolution crop, or the whole matrix pooled; :data:`SNAPSHOT_WINDOWS`)
are kept.

:class:`ImportanceAccumulator` keeps the statistics on the model's device and never waits for it
during a check: modules of equal shape are scored together (one batched GEMM forms ``G̃`` for
several modules, one fused reduction gives ``S``), ``H`` and ``ΣS`` accumulate in device tensors,
and the statistics are copied to the CPU only when they are read (:attr:`ImportanceAccumulator.stats`,
saved or finalized). ``G̃`` is formed in fp32 in blocks of at most ``chunk_rows`` rows of the widest
adapted module (``chunk_rows × max n`` elements): a large module in row chunks, small modules of
one shape several at a time, so the extra memory never grows to ``m × n`` per layer and a model of
many small modules needs few GEMMs. The heat-map snapshot is pooled on every
``snapshot_interval``-th check only.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write
from .peft_layers import lora_layers

STATS_FORMAT = 1

# What the heat-map snapshot covers (``method.snapshot_window``): given a module's ``m × n`` and the
# grid's ``gm × gn`` (``method.snapshot_size``, at most ``m × n``), the window of ``|G̃|`` (its
# first rows and columns) that is average-pooled onto the grid.
SNAPSHOT_WINDOWS = {
    # the first gm rows and gn columns at full resolution, one output neuron per grid row: the
    # paper's "subset of the weights" (captions of Fig. 2/7/8), where a single hot neuron is a band
    "crop": lambda m, n, gm, gn: (gm, gn),
    # the whole matrix, each cell the mean over m/gm rows and n/gn columns: an overview in which
    # neighbouring neurons are averaged together (a band narrower than m/gm rows fades)
    "pool": lambda m, n, gm, gn: (m, n),
}


def covered_window(mode: str, m: int, n: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The rows × columns of ``|G̃|`` that a ``grid`` snapshot of ``mode`` covers."""
    if mode not in SNAPSHOT_WINDOWS:
        raise ValueError(
            f"unknown snapshot window {mode!r} (method.snapshot_window); choose one of {sorted(SNAPSHOT_WINDOWS)}"
        )
    return SNAPSHOT_WINDOWS[mode](m, n, *grid)


def _window_bins(window_rows: int, grid_rows: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid row of each window row, and 1 / (window rows in that grid row)."""
    bins = torch.arange(window_rows) * grid_rows // window_rows
    per_bin = torch.zeros(grid_rows).index_add_(0, bins, torch.ones(window_rows))
    return bins.to(device, non_blocking=True), (1.0 / per_bin)[bins].to(device, non_blocking=True)


def approx_full_grad(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
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


def row_scores(
    A,
    B,
    grad_A,
    grad_B,
    scaling: float = 1.0,
    chunk_rows: int = 1024,
    snapshot: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Row importance ``S_i = Σ_j |G̃_ij|`` (Eq. 8), computed in row chunks.

    If ``snapshot`` (a ``gm × gn`` fp32 tensor) is given, the first ``window`` rows × columns of
    ``|G̃|`` (default: all of it), average-pooled onto that grid, are added into it, so the heat maps
    of Fig. 2/7/8 can be drawn without keeping ``G̃``.
    """
    m, n = B.shape[0], A.shape[1]
    scores = torch.empty(m, dtype=torch.float32, device=B.device)
    if snapshot is not None:
        gn = snapshot.shape[1]
        wm, wn = window or (m, n)
        row_bin, row_weight = _window_bins(wm, snapshot.shape[0], B.device)
    for rows, block in _grad_chunks(A, B, grad_A, grad_B, scaling, chunk_rows):
        block.abs_()
        scores[rows] = block.sum(dim=1)
        if snapshot is not None and rows.start < wm:
            stop = min(rows.stop, wm)
            pooled = F.adaptive_avg_pool1d(block[None, : stop - rows.start, :wn], gn)[0]  # rows × gn
            # each grid cell holds the mean |G̃| over its rows and columns of the window
            snapshot.index_add_(0, row_bin[rows.start : stop], pooled * row_weight[rows.start : stop, None])
    return scores


@dataclass
class ModuleStats:
    """Stage-1 statistics of one ``m × n`` target layer."""

    shape: tuple[int, int]
    hits: torch.Tensor  # H, int64 (m,)
    score_sum: torch.Tensor  # ΣS over checks, float64 (m,)
    checks: int = 0  # T
    # Σ over the T checks of |G̃| pooled to a small grid, float32. When only every k-th check is
    # pooled (``snapshots`` < T), the pooled sum is scaled by T / snapshots, so ``grad_snapshot / T``
    # is the mean pooled |G̃| either way.
    grad_snapshot: torch.Tensor | None = None
    snapshots: int | None = None  # checks actually pooled into grad_snapshot (None: all T)
    # the first rows × columns of |G̃| that grad_snapshot covers (None: all m × n, the pooled overview)
    snapshot_window: tuple[int, int] | None = None

    @classmethod
    def empty(
        cls, m: int, n: int, snapshot_shape: tuple[int, int] | None = (256, 256), window: str = "crop"
    ) -> "ModuleStats":
        snap = covered = None
        if snapshot_shape is not None:
            grid = (min(m, int(snapshot_shape[0])), min(n, int(snapshot_shape[1])))
            snap = torch.zeros(grid)
            covered = covered_window(window, m, n, grid)
        return cls(
            (m, n), torch.zeros(m, dtype=torch.int64), torch.zeros(m, dtype=torch.float64), 0, snap, None, covered
        )

    @property
    def window(self) -> tuple[int, int]:
        """The rows × columns of ``|G̃|`` the snapshot covers."""
        return tuple(self.snapshot_window) if self.snapshot_window is not None else tuple(self.shape)

    def update(self, scores: torch.Tensor) -> None:
        """Alg. 1 lines 10-12: one check with row scores ``S`` (on the statistics' device)."""
        scores = scores.detach().to(self.hits.device, torch.float64)
        self.hits += (scores > scores.mean()).to(torch.int64)
        self.score_sum += scores
        self.checks += 1


def _on_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU copy with its own storage (a view would save its whole base)."""
    return None if t is None else t.detach().to("cpu", copy=True)


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
            "modules": {
                name: {
                    "shape": list(s.shape),
                    "hits": _on_cpu(s.hits),
                    "score_sum": _on_cpu(s.score_sum),
                    "checks": int(s.checks),
                    "grad_snapshot": _on_cpu(s.grad_snapshot),
                    "snapshots": s.snapshots,
                    "snapshot_window": None if s.snapshot_window is None else list(s.snapshot_window),
                }
                for name, s in self.modules.items()
            },
        }
        atomic_write(path, lambda f: torch.save(payload, f), binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceStats":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"importance statistics not found at {path!r}: point method.importance_from at the "
                "importance.pt written by a stage-1 run, or drop it to run stage 1"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file
            # torch's weights_only refusal is a page of advice for trusting other code's pickles:
            # say what it means here; otherwise the error's first line
            if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
                cause = "it holds Python objects, not the tensors and plain values a stage 1 writes"
            elif isinstance(err, pickle.UnpicklingError):
                cause = "not a file torch.save wrote"
            else:
                cause = " ".join([type(err).__name__ + ":", *str(err).strip().splitlines()[:1]])
            raise ValueError(
                f"{path!r} is not a readable importance-statistics file ({cause}); delete it and "
                "re-run stage 1 (rerun the job that wrote it), or point method.importance_from at "
                "another file"
            ) from err
        if not isinstance(payload, dict):
            raise ValueError(
                f"{path!r} holds a {type(payload).__name__}, not importance statistics (a dict "
                "written by a PiLoRA stage 1); point method.importance_from at a stage-1 importance.pt"
            )
        if payload.get("format") != STATS_FORMAT or not isinstance(payload.get("modules"), dict):
            raise ValueError(
                f"{path!r} has importance-statistics format {payload.get('format')!r}, "
                f"this code reads format {STATS_FORMAT}; delete it and rerun the job that wrote it "
                "(its stage 1 runs again)"
            )
        try:
            modules = {
                name: ModuleStats(
                    tuple(d["shape"]),
                    d["hits"],
                    d["score_sum"],
                    int(d["checks"]),
                    d.get("grad_snapshot"),
                    d.get("snapshots"),
                    None if d.get("snapshot_window") is None else tuple(d["snapshot_window"]),  # older: pooled
                )
                for name, d in payload["modules"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{path!r} has damaged module statistics ({type(err).__name__}: {err}); delete it "
                "and rerun the job that wrote it (its stage 1 runs again)"
            ) from err
        return cls(modules, payload.get("meta", {}))

    def check_matches(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Raise a clear error when these statistics were not made for a model with ``shapes``."""
        missing = sorted(set(shapes) - set(self.modules))
        extra = sorted(set(self.modules) - set(shapes))
        wrong = [
            f"{k}: stats {self.modules[k].shape} vs model {tuple(shapes[k])}"
            for k in sorted(set(shapes) & set(self.modules))
            if tuple(self.modules[k].shape) != tuple(shapes[k])
        ]
        if missing or extra or wrong:
            lines = []
            if missing:
                lines.append(f"modules without statistics: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                lines.append(f"statistics for modules the model lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            if wrong:
                lines.append("shape mismatches: " + "; ".join(wrong[:5]))
            raise ValueError(
                "importance statistics do not match this model (" + " | ".join(lines) + "). "
                "Use statistics from a stage-1 run with the same model and target_modules, "
                "or drop method.importance_from to recompute them."
            )


def _adapter_weight(layer: nn.Module, part: str, adapter: str) -> torch.Tensor:
    """``layer.lora_A[adapter].weight`` (``part="lora_A"``) read from the modules' dicts: a check reads
    it for every module, and ``nn.Module.__getattr__`` costs about a microsecond per access."""
    return layer._modules[part]._modules[adapter]._parameters["weight"]


def _block_elems(g: int, m: int, n: int, budget: int) -> int:
    """Elements of the largest block :func:`_group_blocks` forms for ``g`` modules of ``m × n``."""
    if m * n <= budget:
        return min(g, budget // (m * n)) * m * n
    return max(1, budget // n) * n


def _group_blocks(L: torch.Tensor, R: torch.Tensor, buf: torch.Tensor):
    """Yield ``(modules, rows, G̃[modules, rows])`` blocks for a group of equal-shape modules.

    ``L = [B, Gᴮ]`` is ``g × m × 2r`` and ``R = s·[Gᴬ; A]`` is ``g × 2r × n`` (fp32), so one ``bmm``
    forms ``G̃ = s·(B Gᴬ + Gᴮ A)`` for several modules at once. Every block is written into the one
    reusable buffer ``buf`` and holds at most ``buf.numel()`` elements: whole modules when one fits,
    else row chunks of one module. Each block is overwritten by the next: consume it first.
    """
    g, m, _ = L.shape
    n = R.shape[2]
    budget = buf.numel()
    per = max(1, budget // (m * n))
    if per > 1 or m * n <= budget:
        for i in range(0, g, per):
            j = min(i + per, g)
            block = buf[: (j - i) * m * n].view(j - i, m, n)
            torch.bmm(L[i:j], R[i:j], out=block)
            yield slice(i, j), slice(0, m), block
        return
    rows = max(1, budget // n)
    for i in range(g):
        for start in range(0, m, rows):
            stop = min(start + rows, m)
            block = buf[: (stop - start) * n].view(1, stop - start, n)
            torch.bmm(L[i : i + 1, start:stop], R[i : i + 1], out=block)
            yield slice(i, i + 1), slice(start, stop), block


def score_group(
    L: torch.Tensor,
    R: torch.Tensor,
    buf: torch.Tensor,
    hits: torch.Tensor,
    score_sum: torch.Tensor,
    snapshot: torch.Tensor | None = None,
    row_bin: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
) -> None:
    """One check of a group of ``g`` equal-shape modules, on their device, with no host sync.

    Adds Alg. 1 lines 9-12 into ``hits`` (int64 ``g × m``) and ``score_sum`` (float64 ``g × m``) and,
    if ``snapshot`` (``g × gm × gn``) is given, the grid-pooled mean ``|G̃|`` of the first ``window``
    rows × columns (default all; ``row_bin``: grid row of each window row; ``row_weight``: 1 / window
    rows in that grid row).
    """
    g, m, _ = L.shape
    wm, wn = window or (m, R.shape[2])
    scores = torch.empty(g, m, dtype=buf.dtype, device=L.device)
    for mods, rows, block in _group_blocks(L, R, buf):
        torch.linalg.vector_norm(block, ord=1, dim=-1, out=scores[mods, rows])  # S_i = Σ_j |G̃_ij|
        if snapshot is not None and rows.start < wm:
            stop = min(rows.stop, wm)
            rows = slice(rows.start, stop)
            # (modules, rows, gn): |G̃| of the window averaged over column bins (in place: the
            # block is consumed; a crop's columns are the grid's, so the pooling is the identity)
            part = block[:, : stop - rows.start, :wn].abs_()
            gn = snapshot.shape[-1]
            pooled = part if wn == gn else F.adaptive_avg_pool1d(part, gn)
            pooled.mul_(row_weight[rows, None])
            if pooled.dtype != snapshot.dtype:  # float64 adapters: the snapshot stays float32
                pooled = pooled.to(snapshot.dtype)
            snapshot[mods].index_add_(1, row_bin[rows], pooled)
    s64 = scores.to(torch.float64)
    hits.add_(s64 > s64.mean(dim=1, keepdim=True))
    score_sum.add_(s64)


@dataclass
class _Group:
    """Modules of one shape, rank, scaling, dtype and device: scored together."""

    names: list[str]
    layers: list
    scaling: float
    hits: torch.Tensor  # g × m int64, on the device
    score_sum: torch.Tensor  # g × m float64, on the device
    checks: list[int]  # T per module (host counters)
    snapshot: torch.Tensor | None = None  # g × gm × gn float32: Σ over the pooled checks
    snapshots: list[int] | None = None  # pooled checks per module
    row_bin: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None
    window: tuple[int, int] | None = None  # rows × columns of |G̃| the snapshot covers


class ImportanceAccumulator:
    """Accumulates ``H``, ``ΣS`` and ``T`` over the LoRA layers of a model (Alg. 1 lines 4-12).

    Call :meth:`step` once per optimizer step, after gradients are final and before the
    optimizer updates ``A`` and ``B`` (``attach`` registers an optimizer pre-hook that does
    this; with ``transformers.Trainer`` use :class:`ImportanceCallback`).

    The statistics live on the device of the LoRA weights (moved there at the first check) and a
    check never synchronises with the host; :attr:`stats` (and :meth:`finalize`, and saving)
    copies them to the CPU. ``snapshot_interval`` pools the heat-map snapshot on every k-th check;
    ``snapshot_shape`` is its grid and ``snapshot_window`` what it covers (:data:`SNAPSHOT_WINDOWS`).
    """

    def __init__(
        self,
        model: nn.Module,
        interval: int = 10,
        chunk_rows: int = 1024,
        adapter_name: str = "default",
        snapshot_shape: tuple[int, int] | None = (256, 256),
        stats: ImportanceStats | None = None,
        snapshot_interval: int = 1,
        snapshot_window: str = "crop",
    ):
        if interval < 1:
            raise ValueError(f"importance interval K must be ≥ 1, got {interval}")
        if int(snapshot_interval) < 1:
            raise ValueError(
                f"snapshot_interval must be ≥ 1 (pool the heat-map snapshot on every k-th "
                f"importance check), got {snapshot_interval}"
            )
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
        if snapshot_shape is not None and (
            len(snapshot_shape) != 2 or any(not isinstance(v, int) or v < 1 for v in snapshot_shape)
        ):
            raise ValueError(
                f"snapshot size must be two positive integers [rows, columns] (method.snapshot_size), "
                f"got {list(snapshot_shape)}"
            )
        covered_window(snapshot_window, 1, 1, (1, 1))  # an unknown name fails here, naming the choices
        self.layers = lora_layers(model, adapter_name)
        if not self.layers:
            raise ValueError(
                "no LoRA layers found: apply a LoRA adapter (pilora.prepare_model) before "
                "creating the importance accumulator"
            )
        self.adapter_name, self.interval, self.chunk_rows = adapter_name, interval, int(chunk_rows)
        self.snapshot_interval = int(snapshot_interval)
        shapes = {k: tuple(l.get_base_layer().weight.shape) for k, l in self.layers.items()}
        if stats is None:
            stats = ImportanceStats(
                {
                    k: ModuleStats.empty(*s, snapshot_shape=snapshot_shape, window=snapshot_window)
                    for k, s in shapes.items()
                }
            )
        else:
            stats.check_matches(shapes)
        self._stats = stats
        self._groups: list[_Group] | None = None  # device state, built at the first check
        self.checks_done = max((s.checks for s in stats.modules.values()), default=0)
        self.steps_seen = 0

    # -------------------------------------------------------------------- device-side state

    def _stage(self) -> None:
        """Move the statistics to the LoRA weights' device, grouped by (shape, rank, scaling, dtype)."""
        a = self.adapter_name
        by_key: dict = {}
        for name, layer in self.layers.items():
            A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
            key = (tuple(B.shape), A.shape[1], float(layer.scaling[a]), A.dtype, B.dtype, A.device)
            by_key.setdefault(key, []).append(name)
        groups = []
        for (bshape, n, scaling, _, _, device), names in by_key.items():
            mods = [self._stats.modules[k] for k in names]
            snap = snapshots = row_bin = row_weight = window = None
            if all(s.grad_snapshot is not None for s in mods):
                raw = []
                for s in mods:  # back from "Σ over checks" to the sum over the pooled checks
                    pooled = s.checks if s.snapshots is None else s.snapshots
                    raw.append(
                        s.grad_snapshot.float() * (pooled / s.checks) if pooled != s.checks else s.grad_snapshot.float()
                    )
                snap = torch.stack(raw).to(device, non_blocking=True)
                snapshots = [s.checks if s.snapshots is None else s.snapshots for s in mods]
                window = mods[0].window  # equal shapes, one configuration: one window
                row_bin, row_weight = _window_bins(window[0], snap.shape[1], device)
            groups.append(
                _Group(
                    names,
                    [self.layers[k] for k in names],
                    scaling,
                    torch.stack([s.hits for s in mods]).to(device, torch.int64, non_blocking=True),
                    torch.stack([s.score_sum for s in mods]).to(device, torch.float64, non_blocking=True),
                    [int(s.checks) for s in mods],
                    snap,
                    snapshots,
                    row_bin,
                    row_weight,
                    window,
                )
            )
        self._groups = groups
        # the budget of a block: chunk_rows rows of the widest module. Modules with fewer rows share
        # a block (fewer GEMMs and operators per check: host work on a GPU); a larger module is
        # formed in row chunks. The buffer is as large as the largest block some group forms.
        budget = self.chunk_rows * max(n for (_, n, *_) in by_key)
        self._buffer_elems = max(
            _block_elems(len(names), bshape[0], n, budget) for (bshape, n, *_), names in by_key.items()
        )

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the statistics now (on the device once a check has run)."""
        if self._groups is None:
            return [
                t for s in self._stats.modules.values() for t in (s.hits, s.score_sum, s.grad_snapshot) if t is not None
            ]
        return [t for g in self._groups for t in (g.hits, g.score_sum, g.snapshot) if t is not None]

    @property
    def stats(self) -> ImportanceStats:
        """The statistics, copied to the CPU (one transfer per group of modules)."""
        if self._groups is not None:
            for g in self._groups:
                hits, score_sum = g.hits.cpu(), g.score_sum.cpu()
                snap = g.snapshot.cpu() if g.snapshot is not None else None
                for i, name in enumerate(g.names):
                    s = self._stats.modules[name]
                    s.hits, s.score_sum, s.checks = hits[i].clone(), score_sum[i].clone(), g.checks[i]
                    if snap is not None:
                        pooled = g.snapshots[i]
                        s.grad_snapshot = (
                            snap[i] * (s.checks / pooled) if pooled not in (0, s.checks) else snap[i].clone()
                        )
                        s.snapshots = None if pooled == s.checks else pooled
        return self._stats

    # ------------------------------------------------------------------------------ checks

    @torch.no_grad()
    def update(self, snapshot: bool | None = None) -> None:
        """One importance check over every layer, on the device, without a host sync.

        ``snapshot`` forces (True) or skips (False) pooling the heat-map snapshot; by default it is
        pooled on every ``snapshot_interval``-th check (the first one included).
        """
        if self._groups is None:
            self._stage()
        if snapshot is None:
            snapshot = self.checks_done % self.snapshot_interval == 0
        self.checks_done += 1
        a = self.adapter_name
        bufs: dict = {}  # one G̃ buffer per device and dtype, reused by every group of this check
        for g in self._groups:
            A_all = [_adapter_weight(layer, "lora_A", a) for layer in g.layers]
            B_all = [_adapter_weight(layer, "lora_B", a) for layer in g.layers]
            idx = [i for i, (w, v) in enumerate(zip(A_all, B_all)) if w.grad is not None and v.grad is not None]
            if not idx:
                continue  # layers not reached by this batch's loss
            A, B = [A_all[i] for i in idx], [B_all[i] for i in idx]
            dt = torch.promote_types(B[0].dtype, torch.float32)
            # L = [B, Gᴮ] (k × m × 2r), R = s·[Gᴬ; A] (k × 2r × n): four cats per group, no per-module op
            k, (m, r), n = len(idx), B[0].shape, A[0].shape[1]
            L = torch.cat([torch.cat(B).view(k, m, r), torch.cat([b.grad for b in B]).view(k, m, r)], dim=2)
            R = torch.cat([t for w in A for t in (w.grad, w)]).view(k, 2 * r, n)
            if L.dtype != dt:
                L, R = L.to(dt), R.to(dt)
            R.mul_(g.scaling)
            take = snapshot and g.snapshot is not None
            full = len(idx) == len(g.layers)
            hits = g.hits if full else torch.zeros(k, g.hits.shape[1], dtype=g.hits.dtype, device=g.hits.device)
            ssum = (
                g.score_sum
                if full
                else torch.zeros(k, g.score_sum.shape[1], dtype=g.score_sum.dtype, device=g.score_sum.device)
            )
            snap = None
            if take:
                snap = g.snapshot if full else torch.zeros((k,) + tuple(g.snapshot.shape[1:]), device=g.snapshot.device)
            if (L.device, dt) not in bufs:
                bufs[L.device, dt] = torch.empty(self._buffer_elems, dtype=dt, device=L.device)
            score_group(L, R, bufs[L.device, dt], hits, ssum, snap, g.row_bin, g.row_weight, g.window)
            if not full:  # a few layers lacked gradients: add the others' rows one by one
                for j, i in enumerate(idx):
                    g.hits[i].add_(hits[j])
                    g.score_sum[i].add_(ssum[j])
                    if take:
                        g.snapshot[i].add_(snap[j])
            for i in idx:
                g.checks[i] += 1
                if take:
                    g.snapshots[i] += 1

    def step(self, global_step: int | None = None, *, skip_nonfinite: bool = False, params=None) -> bool:
        """Run a check if this optimizer step is a multiple of ``K``; return whether it ran.

        ``skip_nonfinite``: a loss scaler (fp16 ``GradScaler``) drops an update whose gradients
        overflowed; the check of that step is dropped too (Alg. 1 pairs each check with an update),
        instead of adding inf/NaN scores. Its step goes into ``stats.meta["skipped_checks"]``. This
        tests the gradients, so it costs one host sync per check. ``params``: every parameter the
        optimizer steps (the scaler skips on any of them: a head trained in full too); default the
        LoRA ``A``/``B``.
        """
        t = self.steps_seen if global_step is None else global_step
        self.steps_seen = t + 1
        if t % self.interval:
            return False
        if skip_nonfinite and not self.gradients_finite(params):
            self._stats.meta.setdefault("skipped_checks", []).append(int(t))
            return False
        self.update()
        return True

    @property
    def skipped_checks(self) -> list[int]:
        """The optimizer steps whose check :meth:`step` skipped (``skip_nonfinite``)."""
        return self._stats.meta.get("skipped_checks", [])

    def gradients_finite(self, params=None) -> bool:
        """Whether every gradient of ``params`` (default: the LoRA ``A``/``B``) is finite (one fused
        reduction, one host sync)."""
        if params is None:
            params = [
                _adapter_weight(layer, part, self.adapter_name)
                for layer in self.layers.values()
                for part in ("lora_A", "lora_B")
            ]
        grads = [p.grad for p in params if p.grad is not None]
        return not grads or bool(torch.isfinite(nn.utils.get_total_norm(grads, norm_type=float("inf"))))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Check before every ``optimizer.step`` of a hand-written loop; returns the hook handle."""

        def hook(*_):
            self.step()  # a pre-hook must return None

        return optimizer.register_step_pre_hook(hook)

    def finalize(self) -> ImportanceStats:
        """The statistics on the CPU (the only point, besides saving, where they leave the device)."""
        return self.stats
