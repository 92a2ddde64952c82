"""How to hold PiLoRA's stage-2 ``B``: the options measured side by side (host work per step).

    python -m benchmarks.stage2_options [--quick] [--workload llama|host_stack] [--repeats 20] [--out FILE.json]

Every option computes the same ``m × (r + r')`` matrix ``[M ⊗ B_d, c·M̄ ⊗ B_s]`` of Eq. 10 (checked
here to float precision against the layer in :mod:`pilora.layer`), on the LLaMA workload of
:mod:`benchmarks.workloads`, r = 32, r' = 2, 40 % dominant rows:

* ``function``: compact ``B_d``, ``B_s`` leaves; a Python ``autograd.Function`` that zero-fills the
  matrix and index-copies the two blocks (backward: two row gathers);
* ``index``: compact leaves; ``cat`` of the two zero-padded blocks and one row ``index_select``
  (built-in autograd; backward: an index-add);
* ``batched``: compact leaves; one assembly of *every* module's matrix per step: one ``cat`` of all
  blocks, one ``index_select``, one product with the scale, then a view per module;
* ``stored``: one ``m × (r + r')`` leaf per module, ``weight = blocks ⊙ P`` (the layer on its own,
  in any training loop): one elementwise product forward and backward, structural zeros get
  exactly-zero gradients;
* ``hook``: the same leaf used as it is in the forward (its zeros are zero) and a tensor hook that
  clears the zeros' gradient (``c = 1`` only): no forward product, a Python call per module backward;
* ``foreach``: the stored leaf, with every module's product formed at once by one
  ``torch._foreach_mul`` in a forward pre-hook of the model: one product and one backward node per
  step instead of one per module;
* ``step`` (**the trainer's**, :class:`pilora.layer.StepGradientMask`): the stored leaf used as it is
  in the forward, and every module's gradient multiplied by ``P`` with one ``torch._foreach_mul_``
  between the backward and the optimizer step (``c = 1``): no product, no extra autograd node, no
  Python in the forward or backward, one multi-tensor operator per step.

Beside them: stock LoRA (the baseline), LoRA with the fused forward, and ``lora_wide``, LoRA with the
fused forward at rank ``r + r'`` (the same GEMM widths as PiLoRA, without the partition).

Reported per option: ``aten::`` operators per step (torch.profiler, nested ops included), autograd
nodes per step, Python autograd nodes, host time per step (median over interleaved rounds, with
the paired q25–q75 ratio to LoRA), and the numbers the optimizer holds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import operator_profile, require_device, time_interleaved
from benchmarks.report import publish
from benchmarks.stats import ratio_summary
from benchmarks.workloads import (
    DEFAULT_OPTIM,
    HOST_STACK,
    OPTIMIZERS,
    Variant,
    Workload,
    build_variant,
    llama_workload,
    make_optimizer,
    random_masks,
    sizes,
    stack_workload,
)

OPTIONS = ("function", "index", "batched", "stored", "hook", "foreach", "step")


class _StoredLeaf(nn.Module):
    """A copy of the layer's stored ``m × (r + r')`` leaf, for the options that keep that layout
    but form ``weight`` differently; ``dominant`` / ``supplementary`` read the blocks back."""

    def __init__(self, stored):
        super().__init__()
        self.blocks = nn.Parameter(stored.blocks.detach().clone())
        self.dominant_rows, self.supplementary_rows, self.r = stored.dominant_rows, stored.supplementary_rows, stored.r
        self._effective = stored.effective_numel()

    def effective_numel(self) -> int:
        """The layer's Eq. 10 count, so pilora.params.count_parameters reports the paper's number."""
        return self._effective

    @property
    def dominant(self):
        return self.blocks[self.dominant_rows, : self.r]

    @property
    def supplementary(self):
        return self.blocks[self.supplementary_rows, self.r :]

    def forward(self, z):
        return F.linear(z, self.weight)


class HookedB(_StoredLeaf):
    """The stored ``m × (r + r')`` leaf used as it is in the forward (its structural zeros are 0),
    with the zeros' gradient cleared by a tensor hook on the leaf (``c = 1`` only): no product in
    the forward, no ``weight`` temporary saved for the backward, a bool pattern."""

    def __init__(self, stored):
        if stored.supplementary_scale != 1.0:
            raise ValueError("the hook option holds c = 1 only (no scale in the forward)")
        super().__init__(stored)
        zeros = stored.pattern == 0
        self.blocks.register_hook(lambda g, zeros=zeros: g.masked_fill(zeros, 0))

    @property
    def weight(self):
        return self.blocks


class _AssembleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, B_d, B_s, dominant_rows, supplementary_rows, c):
        r = B_d.shape[1]
        out = B_d.new_zeros(dominant_rows.numel() + supplementary_rows.numel(), r + B_s.shape[1])
        out[:, :r].index_copy_(0, dominant_rows, B_d)
        out[:, r:].index_copy_(0, supplementary_rows, B_s * c if c != 1.0 else B_s)
        ctx.save_for_backward(dominant_rows, supplementary_rows)
        ctx.r, ctx.c = r, c
        return out

    @staticmethod
    def backward(ctx, grad):
        dominant_rows, supplementary_rows = ctx.saved_tensors
        g_d = grad[:, : ctx.r].index_select(0, dominant_rows)
        g_s = grad[:, ctx.r :].index_select(0, supplementary_rows)
        return g_d, (g_s * ctx.c if ctx.c != 1.0 else g_s), None, None, None


class CompactB(nn.Module):
    """Compact ``B_d``, ``B_s`` leaves; ``weight`` by one of the compact options."""

    def __init__(self, stored, mode: str):
        super().__init__()
        self.mode, self.r, self.r_s, self.c = mode, stored.r, stored.r_s, stored.supplementary_scale
        self.dominant = nn.Parameter(stored.dominant.detach().clone())
        self.supplementary = nn.Parameter(stored.supplementary.detach().clone())
        self.register_buffer("dominant_rows", stored.dominant_rows.clone())
        self.register_buffer("supplementary_rows", stored.supplementary_rows.clone())
        order = torch.cat([stored.dominant_rows, stored.supplementary_rows])
        self.register_buffer("inverse", torch.argsort(order))
        self.batched_weight = None  # set per step by BatchedAssembly

    @property
    def weight(self):
        if self.mode == "function":
            return _AssembleRows.apply(
                self.dominant, self.supplementary, self.dominant_rows, self.supplementary_rows, self.c
            )
        if self.mode == "index":
            s = self.supplementary * self.c if self.c != 1.0 else self.supplementary
            stacked = torch.cat([F.pad(self.dominant, (0, self.r_s)), F.pad(s, (self.r, 0))])
            return stacked.index_select(0, self.inverse)
        return self.batched_weight

    def forward(self, z):
        return F.linear(z, self.weight)


class BatchedAssembly:
    """A forward pre-hook on the model: every module's matrix from one cat + one index_select."""

    def __init__(self, model: nn.Module, modules: list[CompactB]):
        self.modules = modules
        leaves, index, scale, offset, sizes = [], [], [], 0, []
        total = sum(b.dominant.numel() + b.supplementary.numel() for b in modules)
        zero = total  # the index of an appended 0
        for b in modules:
            m = b.dominant_rows.numel() + b.supplementary_rows.numel()
            idx = torch.full((m, b.r + b.r_s), zero, dtype=torch.long)
            sc = torch.zeros(m, b.r + b.r_s)
            nd = b.dominant.numel()
            idx[b.dominant_rows.cpu(), : b.r] = offset + torch.arange(nd).view(-1, b.r)
            sc[b.dominant_rows.cpu(), : b.r] = 1.0
            idx[b.supplementary_rows.cpu(), b.r :] = offset + nd + torch.arange(b.supplementary.numel()).view(-1, b.r_s)
            sc[b.supplementary_rows.cpu(), b.r :] = b.c
            offset += nd + b.supplementary.numel()
            index.append(idx.flatten())
            scale.append(sc.flatten())
            sizes.append((m, b.r + b.r_s))
            leaves += [b.dominant, b.supplementary]
        dev = modules[0].dominant.device
        self.index, self.scale, self.sizes, self.leaves = (
            torch.cat(index).to(dev),
            torch.cat(scale).to(dev),
            sizes,
            leaves,
        )
        self.zero = torch.zeros(1, device=dev)
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *_):
        flat = torch.cat([p.reshape(-1) for p in self.leaves] + [self.zero])
        weights = (flat.index_select(0, self.index) * self.scale).split([m * k for m, k in self.sizes])
        for b, w, shape in zip(self.modules, weights, self.sizes):
            b.batched_weight = w.view(shape)


class ForeachB(_StoredLeaf):
    """The stored layout whose products ``blocks ⊙ P`` are formed for every module of the model at
    once, by one ``torch._foreach_mul`` in a forward pre-hook (:class:`ForeachProducts`): one
    product and one autograd node per step instead of one per module. ``weight`` is the product of
    the running forward (on a CPU ``_foreach_mul`` loops over the tensors; on a GPU it is one
    multi-tensor kernel)."""

    def __init__(self, stored):
        super().__init__(stored)
        self.pattern = stored.pattern
        self.product = None

    @property
    def weight(self):
        return self.product if self.product is not None else self.blocks * self.pattern


class ForeachProducts:
    """Forward pre-hook of the model: every :class:`ForeachB`'s product with one ``_foreach_mul``.
    Module state is read and written through ``__dict__``: ``nn.Module.__getattr__``/``__setattr__``
    cost microseconds per call, i.e. per module and step."""

    def __init__(self, model: nn.Module, modules: list[ForeachB]):
        self.states = [b.__dict__ for b in modules]
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *_):
        for d in self.states:  # the last step's products go first, so two sets never coexist
            d["product"] = None
        blocks = [d["_parameters"]["blocks"] for d in self.states]
        for d, w in zip(self.states, torch._foreach_mul(blocks, [d["pattern"] for d in self.states])):
            d["product"] = w


def build_option(option: str, wl: Workload, masks: dict, optim: str = DEFAULT_OPTIM) -> Variant:
    from pilora.peft_layers import lora_layers

    v = build_variant("pilora", wl, masks=masks, optim=optim)
    if option != "step":  # every other option forms the zeros itself (stored: the layer's own product)
        v.use_layer_product()
    if option == "stored":
        return v
    mods = []
    g = torch.Generator().manual_seed(3)
    for layer in lora_layers(v.model).values():
        stored = layer.lora_B["default"]
        stored.set_blocks(
            *(0.01 * torch.randn(t.shape, generator=g).to(t) for t in (stored.dominant, stored.supplementary))
        )
        if option == "step":
            continue
        if option in ("hook", "foreach"):
            layer.lora_B["default"] = (HookedB if option == "hook" else ForeachB)(stored)
            mods.append(layer.lora_B["default"])
            continue
        layer.lora_B["default"] = CompactB(stored, "batched" if option == "batched" else option)
        mods.append(layer.lora_B["default"])
    if option == "batched":
        v.model._pilora_batched = BatchedAssembly(v.model, mods)
    if option == "foreach":
        v.model._pilora_foreach = ForeachProducts(v.model, mods)
    if mods:
        v.optimizer = make_optimizer(v.model, optim)
    return v


def check_same_matrix(variants: dict[str, Variant]) -> float:
    """Largest difference between each option's matrices and the stored layer's, same values."""
    from pilora.peft_layers import lora_layers

    ref = {k: l.lora_B["default"] for k, l in lora_layers(variants["stored"].model).items()}
    worst = 0.0
    for name, v in variants.items():
        if name == "stored":
            continue
        layers = lora_layers(v.model)
        if name == "batched":
            v.model._pilora_batched()
        for k, l in layers.items():
            b = l.lora_B["default"]
            ref[k].set_blocks(b.dominant.detach(), b.supplementary.detach())
            if name in ("hook", "foreach", "step"):  # the same values in the structural zeros too
                worst = max(worst, (b.blocks.detach() - ref[k].blocks.detach()).abs().max().item())
            worst = max(worst, (b.weight.detach() - ref[k].weight.detach()).abs().max().item())
    return worst


def run(
    quick: bool = True,
    repeats: int = 20,
    warmup: int = 2,
    device: str = "cpu",
    config: dict | None = None,
    batch: int | None = None,
    seq: int | None = None,
    optim: str = DEFAULT_OPTIM,
    workload: str = "llama",
) -> dict:
    sz = sizes(quick, device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if workload == "host_stack":  # 80 tiny modules: a step's time is its host work
        wl = stack_workload("host_stack", **HOST_STACK, dtype=dtype, device=device, steps_per_sample=1)
    else:
        wl = llama_workload(
            "llama", config or sz["llama"], batch or sz["batch"], seq or sz["seq"], dtype, device, steps_per_sample=1
        )
    masks = random_masks(wl.reference, wl.targets)
    variants = {m: build_variant(m, wl, optim=optim) for m in ("lora", "lora_fused", "lora_wide")}
    variants.update({o: build_option(o, wl, masks, optim) for o in OPTIONS})
    max_diff = check_same_matrix({o: variants[o] for o in OPTIONS})
    for v in variants.values():
        v.step()
    fns = {m: v.step for m, v in variants.items()}
    samples = time_interleaved(fns, repeats, warmup, device)
    summary = ratio_summary(samples)
    ops = {m: operator_profile(fns[m], device, 1) for m in fns}
    out = {"workload": wl.meta, "optim": optim, "repeats": repeats, "max_abs_diff_vs_stored": max_diff, "options": {}}
    for m in fns:
        out["options"][m] = {
            "median_s": summary[m]["median_s"],
            "ratio": summary[m]["ratio"],
            "paired_ratio": summary[m]["paired_ratio"],
            **ops[m],
            "ops_ratio": ops[m]["ops"] / ops["lora"]["ops"],
            "trainable": variants[m].adapter_params(),
            "stored": variants[m].stored_params(),
        }
    return out


def format_table(res: dict) -> str:
    lines = [
        f"# stage-2 B options on {res['workload']} ({res['repeats']} rounds); "
        f"matrices agree to {res['max_abs_diff_vs_stored']:.1e}",
        f"{'option':<11} {'step ms':>8} {'×LoRA':>7} {'paired q25–q75':>15} {'ops/step':>9} {'×LoRA':>7} "
        f"{'nodes':>6} {'Python':>6} {'trainable':>10} {'stored':>9}",
    ]
    for m, o in res["options"].items():
        pr = o["paired_ratio"]
        lines.append(
            f"{m:<11} {1e3 * o['median_s']:>8.2f} {o['ratio']:>7.3f} {pr['q25']:>7.3f}–{pr['q75']:<7.3f} "
            f"{o['ops']:>9.0f} {o['ops_ratio']:>7.3f} {o['autograd_nodes']:>6.0f} {o['python_functions']:>6.0f} "
            f"{o['trainable']:>10} {o['stored']:>9}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage2_options", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny LLaMA (else llama_small)")
    p.add_argument(
        "--workload",
        choices=["llama", "host_stack"],
        default="llama",
        help="llama (llama_small, or the tiny LLaMA with --quick) or host_stack (80 tiny modules: host work)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--optim", choices=list(OPTIMIZERS), default=DEFAULT_OPTIM, help="AdamW (trainer.optim name)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    require_device(args.device)
    res = run(args.quick, args.repeats, args.warmup, args.device, optim=args.optim, workload=args.workload)
    return publish(res, args, "benchmarks.stage2_options", format_table(res))


if __name__ == "__main__":
    main()
