"""The memory of one importance pass: peak extra bytes of ``ImportanceAccumulator.update()`` and the
``G̃`` blocks it forms, alive at once, against one chunk and a dense ``m × n``."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from benchmarks.harness import peak_extra_bytes
from benchmarks.workloads import CHUNK_ROWS, LayerSet, method_config


class ChunkProbe:
    """Wrap ``pilora.importance._grad_chunks``: record every ``G̃`` block it yields, the bound
    ``chunk_rows × n``, and how many distinct block storages are alive (still referenced by the
    library) at the moment a new block has been formed. Views of one reused buffer count once."""

    def __init__(self):
        self.max_block_elems = 0
        self.bound_elems = 0
        self.max_live = 0
        self.blocks = 0
        self._refs: list[weakref.ref] = []
        self._orig = None

    def _record(self, block: torch.Tensor) -> None:
        self.blocks += 1
        self.max_block_elems = max(self.max_block_elems, block.numel())
        self._refs = [r for r in self._refs if r() is not None] + [weakref.ref(block)]
        live = {(t.device, t.untyped_storage().data_ptr()) for t in (r() for r in self._refs) if t is not None}
        self.max_live = max(self.max_live, len(live))

    def __enter__(self):
        from pilora import importance

        self._orig = orig = importance._grad_chunks
        self._orig_group = orig_group = importance._group_blocks
        probe = self

        def wrapped(A, B, grad_A, grad_B, scaling, chunk_rows):
            probe.bound_elems = max(probe.bound_elems, min(chunk_rows, B.shape[0]) * A.shape[1])
            for item in orig(A, B, grad_A, grad_B, scaling, chunk_rows):
                probe._record(item[1])
                yield item
                del item  # hold no reference of our own while the next block is formed

        def wrapped_group(L, R, buf):
            # the accumulator's bound: chunk_rows rows of the widest module (chunk_rows × max n)
            probe.bound_elems = max(probe.bound_elems, buf.numel())
            for item in orig_group(L, R, buf):
                probe._record(item[2])
                yield item
                del item

        importance._grad_chunks = wrapped
        importance._group_blocks = wrapped_group
        return self

    def __exit__(self, *exc):
        from pilora import importance

        importance._grad_chunks = self._orig
        importance._group_blocks = self._orig_group
        return False


def importance_memory(
    shapes: dict[str, tuple[int, int]], dtype, device: str, seed: int = 0, where: str = "7B layer set"
) -> dict:
    """Peak extra bytes and live ``G̃`` blocks of one ``ImportanceAccumulator.update()``."""
    from pilora import ImportanceAccumulator, prepare_model
    from pilora.peft_layers import lora_layers

    g = torch.Generator().manual_seed(seed)
    weights = {
        k: nn.Parameter(torch.randn(o, i, generator=g).to(device=device, dtype=dtype) / i**0.5, requires_grad=False)
        for k, (i, o) in shapes.items()
    }
    model = prepare_model(LayerSet(weights), method_config("stage1", ["proj"]), stage=1)
    acc = ImportanceAccumulator(model, interval=1, chunk_rows=CHUNK_ROWS)
    with torch.no_grad():  # gradients as a backward pass would leave them (values do not matter)
        for layer in lora_layers(model).values():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=g).to(B))
            A.grad = torch.randn(A.shape, generator=g).to(A)
            B.grad = torch.randn(B.shape, generator=g).to(B)
    acc.update()  # first call moves snapshots / warms up kernels
    with ChunkProbe() as probe:
        peak = peak_extra_bytes(acc.update, device)
    fp32 = 4
    chunk = max(min(CHUNK_ROWS, o) * i for i, o in shapes.values()) * fp32
    dense = max(o * i for i, o in shapes.values()) * fp32
    out = {
        "layers": {
            k: {"m": o, "n": i, "chunk_bytes": min(CHUNK_ROWS, o) * i * fp32, "dense_bytes": o * i * fp32}
            for k, (i, o) in shapes.items()
        },
        "chunk_rows": CHUNK_ROWS,
        "peak_extra_bytes": peak,
        "chunk_bytes": chunk,
        "dense_bytes": dense,
        "max_block_elems": probe.max_block_elems,
        "chunk_bound_elems": probe.bound_elems,
        "max_live_blocks": probe.max_live,
        "blocks_formed": probe.blocks,
        "where": where,
    }
    del model, acc
    gc.collect()
    return out
