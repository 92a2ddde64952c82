import copy
import os

import pytest
import torch
from conftest import TINY_LLAMA, TinyMLP, train_steps
from peft import PeftModel
from torch import nn

from pilora import MethodConfig, count_parameters, export_lora, load_adapter, pilora_masks, prepare_model, save_adapter
from pilora.layer import FusedLoraForward, RowPartitionedB, StepGradientMask
from pilora.peft_layers import lora_layers

X = torch.randn(20, 10, generator=torch.Generator().manual_seed(5))
Y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(6))
MASKS = {
    "up": torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool),
    "down": torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool),
}


def _pilora(r=4, rs=1, masks=MASKS, **kw):
    torch.manual_seed(0)
    base = TinyMLP()
    cfg = MethodConfig(
        name="pilora", r=r, alpha=2 * r, dropout=0.0, target_modules=["up", "down"], supplementary_r=rs, **kw
    )
    return base, prepare_model(copy.deepcopy(base), cfg, masks=masks)


def test_output_equals_base_at_init_and_param_count_matches_formula():
    base, model = _pilora()
    assert torch.allclose(model(X), base(X), atol=1e-6)
    r, rs = 4, 1
    expected = sum(
        (r + rs) * n + int(M.sum()) * r + (M.numel() - int(M.sum())) * rs
        for M, n in ((MASKS["up"], 10), (MASKS["down"], 16))
    )
    count = count_parameters(model)
    assert count.adapter == expected == count.trainable
    # the optimizer holds B as one m × (r + r') tensor per layer: reported, not hidden
    stored = sum((r + rs) * n + M.numel() * (r + rs) for M, n in ((MASKS["up"], 10), (MASKS["down"], 16)))
    assert count.stored_trainable == stored > count.trainable
    B = lora_layers(model)["up"].lora_B["default"]
    assert B.dominant.shape == (6, 4) and B.supplementary.shape == (10, 1)
    assert B.blocks.shape == (16, 5) and B.effective_numel() == 6 * 4 + 10 * 1
    # the saved adapter keeps the compact blocks (no structural zeros on disk)
    assert {k.rsplit(".", 1)[-1] for k in model.state_dict() if ".lora_B." in k} == {
        "dominant",
        "supplementary",
        "dominant_mask",
    }


def test_only_adapter_weights_change_after_a_step():
    _, model = _pilora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, X, Y, steps=2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(("lora_A" in k or "lora_B" in k) for k in changed)
    assert any("supplementary" in k for k in changed) and any("dominant" in k for k in changed)


def _effective_weight(layer):
    return layer.get_base_layer().weight + layer.get_delta_weight("default")


def test_forward_matches_eq10_and_merge_unmerge_unload_agree():
    _, model = _pilora()
    train_steps(model, X, Y, steps=3)
    layer = lora_layers(model)["up"]
    B = layer.lora_B["default"]
    A = layer.lora_A["default"].weight
    s = layer.scaling["default"]
    # Eq. 10 written out with explicit masks (the hot path never builds these)
    Bd_full = torch.zeros(16, 4)
    Bd_full[MASKS["up"]] = B.dominant.detach()
    Bs_full = torch.zeros(16, 1)
    Bs_full[~MASKS["up"]] = B.supplementary.detach()
    delta = s * (Bd_full @ A[:4] + Bs_full @ A[4:])
    assert torch.allclose(layer.get_delta_weight("default"), delta, atol=1e-6)

    W0 = layer.get_base_layer().weight.detach().clone()
    out = model(X).detach()
    model.merge_adapter()
    assert torch.allclose(model(X), out, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(layer.get_base_layer().weight, W0, atol=1e-6)  # unmerge restores W0
    assert torch.allclose(model(X), out, atol=1e-5)
    safe = copy.deepcopy(model).merge_and_unload(safe_merge=True)  # FusedLoraForward.merge_safe
    assert torch.allclose(safe(X), out, atol=1e-5)
    merged = model.merge_and_unload()  # FusedLoraForward.merge_unsafe
    assert not any(isinstance(m, RowPartitionedB) for m in merged.modules())
    assert torch.allclose(merged(X), out, atol=1e-5)


def test_frozen_supplementary_rows_never_change_with_r_prime_zero():
    _, model = _pilora(rs=0)
    layers = lora_layers(model)
    W0 = {k: l.get_base_layer().weight.detach().clone() for k, l in layers.items()}
    train_steps(model, X, Y, steps=4, lr=5e-2)
    for k, layer in layers.items():
        W = _effective_weight(layer).detach()
        sup = ~MASKS[k]
        assert torch.equal(W[sup], W0[k][sup])  # supplementary rows frozen exactly
        assert not torch.allclose(W[~sup], W0[k][~sup])  # dominant rows learnt


def test_save_load_and_export_to_stock_peft_give_identical_outputs(tmp_path):
    base, model = _pilora()
    train_steps(model, X, Y, steps=3)
    model.eval()
    out = model(X).detach()
    save_adapter(model, str(tmp_path / "pilora"))
    loaded = load_adapter(copy.deepcopy(base), str(tmp_path / "pilora"))
    assert torch.equal(loaded(X), out)
    assert all(torch.equal(pilora_masks(loaded)[k], MASKS[k]) for k in MASKS)

    export_lora(model, str(tmp_path / "lora"))
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    stock.eval()
    assert torch.allclose(stock(X), out, atol=1e-6)
    assert stock.peft_config["default"].r == 5


def test_loading_into_mismatched_partition_is_rejected():
    _, model = _pilora()
    other = {k: ~v for k, v in MASKS.items()}
    _, model2 = _pilora(masks=other)
    with pytest.raises(ValueError, match="dominant rows differ"):
        model2.load_state_dict(model.state_dict())


def test_all_dominant_and_none_dominant_edge_cases():
    for fill in (True, False):
        masks = {k: torch.full_like(v, fill) for k, v in MASKS.items()}
        base, model = _pilora(masks=masks)
        assert torch.allclose(model(X), base(X), atol=1e-6)
        train_steps(model, X, Y, steps=2)
        assert torch.isfinite(model(X)).all()


def test_supplementary_alpha_scales_the_supplementary_block():
    _, model = _pilora(supplementary_alpha=8.0)  # s_d = 8/4 = 2, s_s = 8/1 = 8 → c = 4
    B = lora_layers(model)["up"].lora_B["default"]
    assert B.supplementary_scale == pytest.approx(4.0)
    B.set_blocks(supplementary=torch.ones(10, 1))
    assert torch.allclose(B.weight[~MASKS["up"], 4:], torch.full((10, 1), 4.0))
    with pytest.raises(ValueError, match=r"shape \(10, 1\)"):
        B.set_blocks(supplementary=torch.ones(16, 1))


@pytest.mark.parametrize("c", [1.0, 4.0])
def test_block_matrix_and_gradients_match_separately_stored_blocks_in_float64(c):
    """``blocks ⊙ P`` equals Eq. 9's masked expansion of separately stored ``B_d``, ``B_s``; the
    gradient of a dominant/supplementary entry equals the compact one and a structural zero's is 0."""
    mask = MASKS["up"]
    torch.manual_seed(1)
    B = RowPartitionedB(mask, r=3, r_s=2, supplementary_scale=c, dtype=torch.float64)
    Bd, Bs = torch.randn(6, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    B.set_blocks(Bd, Bs)
    Bd, Bs = Bd.clone().requires_grad_(), Bs.clone().requires_grad_()
    # reference: the explicit masked expansion of Eq. 9, from compact leaves
    ref = torch.zeros(16, 5, dtype=torch.float64)
    ref = ref.index_put((mask.nonzero().flatten(),), torch.nn.functional.pad(Bd, (0, 2)))
    ref = ref.index_put(((~mask).nonzero().flatten(),), torch.nn.functional.pad(c * Bs, (3, 0)))
    assert torch.equal(B.weight, ref)
    w = torch.randn(16, 5, dtype=torch.float64)
    (g_blocks,) = torch.autograd.grad((B.weight * w).sum(), [B.blocks])
    g_d, g_s = torch.autograd.grad((ref * w).sum(), [Bd, Bs])
    assert torch.equal(g_blocks[mask, :3], g_d) and torch.equal(g_blocks[~mask, 3:], g_s)
    assert torch.count_nonzero(g_blocks[mask, 3:]) == 0 and torch.count_nonzero(g_blocks[~mask, :3]) == 0
    assert torch.autograd.gradcheck(lambda b: b * B.pattern, (B.blocks.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("zeros", ["product", "step_mask"])
def test_training_equals_separately_stored_blocks_and_keeps_structural_zeros(optim, zeros):
    """Steps of SGD / AdamW (weight decay, gradient clipping) on the stored ``m × (r + r')`` B give the
    trajectory of a compact reference (``B_d``, ``B_s`` as their own leaves), to float64 precision:
    with the per-forward product ``blocks ⊙ P`` (here with ``c = 4``) and with the leaf used as it is
    and a StepGradientMask called between backward and clipping (``c = 1``, the trainer's way)."""
    _, model = _pilora(supplementary_alpha=8.0 if zeros == "product" else None)
    model.double()
    mask = StepGradientMask(model) if zeros == "step_mask" else None
    if mask is not None:
        assert len(mask.layers) == 2
        assert all(
            layer.lora_B["default"].weight is layer.lora_B["default"].blocks for layer in lora_layers(model).values()
        )
    x, y = X.double(), Y
    layers = lora_layers(model)
    # reference: the same math with compact leaves, written out per Eq. 10
    ref = {
        k: {
            "A": l.lora_A["default"].weight.detach().clone().requires_grad_(),
            "Bd": l.lora_B["default"].dominant.detach().clone().requires_grad_(),
            "Bs": l.lora_B["default"].supplementary.detach().clone().requires_grad_(),
        }
        for k, l in layers.items()
    }
    net = model.base_model.model

    def ref_forward(x):
        h = x
        for name in ("up", "down"):
            layer, p = layers[name], ref[name]
            B = layer.lora_B["default"]
            full = torch.zeros(B.out_features, B.r + B.r_s, dtype=torch.float64)
            full = full.index_put((B.dominant_rows,), torch.nn.functional.pad(p["Bd"], (0, B.r_s)))
            full = full.index_put(
                (B.supplementary_rows,), torch.nn.functional.pad(B.supplementary_scale * p["Bs"], (B.r, 0))
            )
            h = torch.tanh(layer.get_base_layer()(h) + layer.scaling["default"] * (h @ p["A"].t()) @ full.t())
        return net.head(h)

    ours = [p for p in model.parameters() if p.requires_grad]
    theirs = [t for p in ref.values() for t in p.values()]
    make = (
        (lambda ps: torch.optim.SGD(ps, lr=0.5))
        if optim == "sgd"
        else (lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1))
    )
    opts = [make(ours), make(theirs)]
    for _ in range(4):
        for opt, fwd, params in ((opts[0], model, ours), (opts[1], ref_forward, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fwd(x), y).backward()
            if mask is not None and fwd is model:
                mask()
            torch.nn.utils.clip_grad_norm_(params, 0.05)  # active: the structural zeros add nothing to the norm
            opt.step()
    for k, layer in layers.items():
        B = layer.lora_B["default"]
        torch.testing.assert_close(B.dominant, ref[k]["Bd"].detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(B.supplementary, ref[k]["Bs"].detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(layer.lora_A["default"].weight, ref[k]["A"].detach(), rtol=1e-12, atol=1e-13)
        assert torch.count_nonzero(B.blocks * (B.pattern == 0)) == 0  # structural zeros exactly zero
        assert torch.count_nonzero(B.dominant) > 0


def test_a_step_mask_that_is_never_called_is_caught_when_saving(tmp_path):
    """Under a StepGradientMask the structural zeros get gradients in the backward; a loop that skips
    ``mask()`` moves them, and saving the layer (whose compact blocks would hide it) raises, naming
    the fix. ``remove()`` returns the layer to the product, which needs no call."""
    _, model = _pilora()
    mask = StepGradientMask(model)
    train_steps(model, X, Y, steps=1)
    B = lora_layers(model)["up"].lora_B["default"]
    assert B.structural_zeros_moved()
    with pytest.raises(RuntimeError, match=r"structural zeros of B are non-zero.*StepGradientMask.*mask\(\)"):
        save_adapter(model, str(tmp_path / "a"))
    mask.remove()
    assert not mask and not B.masked_per_step and B.weight is not B.blocks
    with torch.no_grad():
        B.blocks.mul_(B.pattern)  # back on Eq. 10's set; from here the product keeps it there
    train_steps(model, X, Y, steps=2)
    assert not B.structural_zeros_moved()
    save_adapter(model, str(tmp_path / "b"))


def _tiny_args(output_dir, **overrides):
    """TrainingArguments for the Trainer tests on the tiny MLP: CPU, batch 5, log every step, no saving."""
    from transformers import TrainingArguments

    kw = dict(
        per_device_train_batch_size=5,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    return TrainingArguments(output_dir=str(output_dir), **{**kw, **overrides})


def _trainer_run(tmp_path, trainer_cls, name):
    torch.manual_seed(0)
    cfg = MethodConfig(name="pilora", r=4, alpha=8, dropout=0.0, target_modules=["up", "down"], supplementary_r=2)
    model = prepare_model(_WithLoss(), cfg, masks=MASKS)
    with torch.no_grad():  # non-zero B, so A's gradient and the clipping norm see every block
        for layer in lora_layers(model).values():
            B = layer.lora_B["default"]
            B.set_blocks(0.1 * torch.randn_like(B.dominant), 0.1 * torch.randn_like(B.supplementary))
    start = lora_layers(model)["up"].lora_B["default"].dominant.clone()
    data = [{"x": X[i], "labels": Y[i]} for i in range(len(X))]
    args = _tiny_args(
        tmp_path / name,
        max_steps=3,
        gradient_accumulation_steps=2,
        max_grad_norm=0.01,  # active: the zeros' gradients would change the norm if they reached it
        learning_rate=0.05,
        seed=0,
    )
    seen = []

    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            B = lora_layers(model)["up"].lora_B["default"]
            seen.append((B.masked_per_step, torch.count_nonzero(B.blocks.grad * (B.pattern == 0)).item()))
            assert not torch.equal(B.dominant, start) or state.global_step == 0

    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[Watch()])
    trainer.train()
    return model, trainer, seen


def test_pilora_trainer_holds_the_zeros_once_per_step_and_trains_as_the_product(tmp_path):
    """PiLoRATrainer (what train.py uses) runs the layers without their product and masks after each
    backward, before clipping: with gradient accumulation and active clipping it gives the weights
    and the logged gradient norms of the stock Trainer with the per-forward product."""
    from transformers import Trainer

    from pilora.trainer import PiLoRATrainer

    stock, stock_trainer, stock_seen = _trainer_run(tmp_path, Trainer, "stock")
    ours, our_trainer, our_seen = _trainer_run(tmp_path, PiLoRATrainer, "ours")
    assert stock_seen == [(False, 0)] * 3  # the product: zero gradients, no mask
    assert our_seen == [(True, 0)] * 3  # the mask: on during train(), gradients masked before clipping
    norms = [[e["grad_norm"] for e in t.state.log_history if "grad_norm" in e] for t in (stock_trainer, our_trainer)]
    assert len(norms[0]) == 3 and min(norms[0]) > 0.01  # clipping was active at every step
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
    for (k, a), b in zip(lora_layers(stock).items(), lora_layers(ours).values()):
        Ba, Bb = a.lora_B["default"], b.lora_B["default"]
        assert not Bb.masked_per_step  # removed after train(): evaluation and later use need no call
        assert not Bb.structural_zeros_moved()
        torch.testing.assert_close(Bb.dominant, Ba.dominant, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(Bb.supplementary, Ba.supplementary, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.lora_A["default"].weight, a.lora_A["default"].weight, rtol=1e-5, atol=1e-7)


def test_pilora_trainer_keeps_the_product_where_deepspeed_or_fsdp_own_the_gradients(tmp_path, monkeypatch):
    """Flattened or sharded gradients have no per-layer ``.grad`` to mask: the layers keep their product."""
    from pilora import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_sharded", lambda trainer: True)
    model, trainer, seen = _trainer_run(tmp_path, trainer_module.PiLoRATrainer, "sharded")
    assert seen == [(False, 0)] * 3 and trainer.grad_mask is None


def _without_variant(model):
    """The same model with PEFT's vanilla adapter forward ``result + B(A(dropout(x))) * s``."""
    plain = copy.deepcopy(model)
    for layer in lora_layers(plain).values():
        layer.lora_variant.clear()
    return plain


def _input(layout: str) -> torch.Tensor:
    """A (batch, seq, n) input, a (tokens, n) one, or a non-contiguous (batch, seq, n) one."""
    if layout == "2d":
        return torch.randn(14, 10, dtype=torch.float64, requires_grad=True)
    if layout == "transposed":
        return torch.randn(7, 2, 10, dtype=torch.float64).transpose(0, 1).requires_grad_(True)
    return torch.randn(2, 7, 10, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("dropout,layout", [(0.0, "3d"), (0.3, "3d"), (0.3, "2d"), (0.3, "transposed")])
def test_fused_forward_equals_pefts_vanilla_forward_in_value_and_gradient(dropout, layout):
    _, model = _pilora()
    for layer in lora_layers(model).values():
        layer.lora_dropout["default"].p = dropout
    train_steps(model, X, Y, steps=2)  # non-zero B blocks
    model.double()
    assert all(isinstance(l.lora_variant["default"], FusedLoraForward) for l in lora_layers(model).values())
    plain = _without_variant(model)
    x = _input(layout)
    assert x.is_contiguous() == (layout != "transposed")
    outs, grads = [], []
    for m in (model, plain):
        torch.manual_seed(3)  # same dropout masks
        out = m(x)
        params = [p for p in m.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(out.pow(2).sum(), params + [x]))
        outs.append(out)
    assert outs[0].shape == (*x.shape[:-1], 3)
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b, atol=1e-11) for a, b in zip(*grads))


def test_fused_forward_with_fp32_adapters_on_a_bf16_base():
    _, model = _pilora()
    train_steps(model, X, Y, steps=2)
    for layer in lora_layers(model).values():  # PEFT's autocast_adapter_dtype layout
        layer.get_base_layer().to(torch.bfloat16)
    model.base_model.model.head.to(torch.bfloat16)
    plain = _without_variant(model)
    x = X.to(torch.bfloat16)
    out, ref = model(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)  # sums in fp32, rounded once to bf16
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_fused_forward_flag_picks_the_forward_for_lora_and_pilora_without_changing_the_math():
    def build(name, fused, **kw):
        torch.manual_seed(0)
        cfg = MethodConfig(
            name=name, r=4, alpha=8, dropout=0.0, target_modules=["up", "down"], fused_forward=fused, **kw
        )
        return prepare_model(TinyMLP(), cfg, masks=MASKS if name == "pilora" else None)

    def variants(model):
        return {type(l.lora_variant.get("default")).__name__ for l in lora_layers(model).values()}

    assert variants(build("lora", None)) == {"NoneType"}  # stock PEFT LoRA by default
    assert variants(build("pilora", None, supplementary_r=1)) == {"FusedLoraForward"}
    for name, kw in (("lora", {}), ("pilora", {"supplementary_r": 1})):
        fused, plain = build(name, True, **kw), build(name, False, **kw)
        assert variants(fused) == {"FusedLoraForward"} and variants(plain) == {"NoneType"}
        plain.load_state_dict(fused.state_dict())
        for m in (fused, plain):
            train_steps(m, X, Y, steps=2)  # identical math → identical trajectories (to rounding)
        assert torch.allclose(fused(X), plain(X), atol=1e-6)
    with pytest.raises(ValueError, match="DoRA has its own forward"):
        MethodConfig(name="dora", fused_forward=True)


# ----------------------------------------------------------------------------- torch.compile


def _build(name, stage2, step_mask=False):
    """``step_mask``: the stage-2 layers as PiLoRATrainer trains them (c = 1, no product)."""
    torch.manual_seed(0)
    cfg = MethodConfig(
        name=name,
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["up", "down"],
        supplementary_r=1,
        supplementary_alpha=4.0 if name == "pilora" and not step_mask else None,
    )
    model = prepare_model(TinyMLP(), cfg, masks=MASKS if stage2 else None)
    if step_mask:
        assert len(StepGradientMask(model).layers) == 2
    return model


COMPILED = [("lora", False, False), ("pilora", False, False), ("pilora", True, False), ("pilora", True, True)]


@pytest.mark.parametrize("name,stage2,step_mask", COMPILED)
def test_no_graph_break_in_the_adapter_layers_or_the_model(name, stage2, step_mask):
    model = _build(name, stage2, step_mask)
    for target in (lora_layers(model)["up"], model):
        explained = torch._dynamo.explain(target)(X)
        assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("name,stage2,step_mask", [c for c in COMPILED if c != ("pilora", False, False)])
def test_compiled_training_step_equals_eager_and_feeds_the_importance_check(name, stage2, step_mask):
    """fullgraph torch.compile (aot_eager: dynamo + AOT autograd, no C++ toolchain needed) gives the
    eager outputs and gradients; the stage-1 check reads the compiled backward's gradients."""
    from pilora import ImportanceAccumulator

    eager = _build(name, stage2, step_mask).double()
    if stage2:
        with torch.no_grad():  # non-zero B blocks so every gradient path is exercised
            for layer in lora_layers(eager).values():
                B = layer.lora_B["default"]
                B.set_blocks(torch.randn_like(B.dominant), torch.randn_like(B.supplementary))
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = X.double()
    results = []
    for m in (eager, compiled):
        out = m(x)
        loss = torch.nn.functional.cross_entropy(out, Y)
        loss.backward()
        results.append(
            (out.detach(), [p.grad for p in (eager if m is eager else model).parameters() if p.requires_grad])
        )
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if not stage2:
        stats = []
        for m in (eager, model):
            acc = ImportanceAccumulator(m, interval=1)
            acc.update()
            stats.append(acc.finalize())
        for k, s in stats[0].modules.items():
            assert torch.equal(s.hits, stats[1].modules[k].hits)
            torch.testing.assert_close(s.score_sum, stats[1].modules[k].score_sum)


class _WithLoss(TinyMLP):
    def forward(self, x, labels=None):
        logits = super().forward(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.slow
@pytest.mark.parametrize("stage2", [False, True])
def test_trainer_torch_compile_runs_both_stages(tmp_path, stage2):
    """``trainer.torch_compile=true`` as train.py passes it: the Trainer compiles the PEFT model; stage 1
    with the importance callback, stage 2 with the PiLoRA layers under PiLoRATrainer's step mask
    (aot_eager backend here: no C++ toolchain; a GPU run uses inductor)."""

    from pilora import ImportanceAccumulator
    from pilora.callbacks import ImportanceCallback
    from pilora.trainer import PiLoRATrainer

    torch.manual_seed(0)
    cfg = MethodConfig(name="pilora", r=4, alpha=8, dropout=0.1, target_modules=["up", "down"], supplementary_r=1)
    model = prepare_model(_WithLoss(), cfg, masks=MASKS if stage2 else None)
    data = [{"x": X[i], "labels": Y[i]} for i in range(len(X))]
    args = _tiny_args(tmp_path, max_steps=4, torch_compile=True, torch_compile_backend="aot_eager")
    callbacks = []
    if not stage2:
        acc = ImportanceAccumulator(model, interval=2)
        callbacks.append(ImportanceCallback(acc))
    trainer = PiLoRATrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert not any(layer.lora_B["default"].structural_zeros_moved() for layer in lora_layers(model).values() if stage2)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if not stage2:
        assert all(s.checks == 2 for s in acc.finalize().modules.values())


def test_bad_masks_are_clear_errors_naming_the_fix():
    for bad, match in (
        (torch.ones(15, dtype=torch.bool), r"has shape \(15,\) but the layer has 16 output rows"),
        (torch.ones(16, 1, dtype=torch.bool), r"1-D mask of length m"),
        (torch.full((16,), 0.5), r"must be bool \(or 0/1\)"),
        (torch.ones(16, dtype=torch.bool, device="meta"), r"meta device .* \(pilora.partition\)"),
    ):
        with pytest.raises(ValueError, match=match):
            _pilora(masks={"up": bad, "down": MASKS["down"]})
    # a 0/1 integer mask (e.g. from a saved int8 buffer) on any device is read once and accepted
    _, model = _pilora(masks={"up": MASKS["up"].to(torch.int8), "down": MASKS["down"].float()})
    assert torch.equal(pilora_masks(model)["up"], MASKS["up"])


def test_derived_tensors_follow_the_module_but_are_not_buffers():
    """Only the mask is a buffer (DDP broadcasts buffers every forward); the pattern and row indices
    are derived and follow .to() / .double() like buffers do."""
    _, model = _pilora(supplementary_alpha=8.0)
    B = lora_layers(model)["up"].lora_B["default"]
    assert {n for n, _ in B.named_buffers()} == {"dominant_mask"}
    model.double()
    assert B.pattern.dtype == B.blocks.dtype == torch.float64 and B.dominant_rows.dtype == torch.int64
    clone = copy.deepcopy(model)
    Bc = lora_layers(clone)["up"].lora_B["default"]
    assert torch.equal(Bc.pattern, B.pattern) and Bc.pattern.data_ptr() != B.pattern.data_ptr()
    model.to("meta")
    assert B.pattern.device.type == "meta" and B.supplementary_rows.device.type == "meta"


def test_derived_tensors_follow_blocks_that_fsdp_moved_without_apply():
    """FSDP2's ``fully_shard`` moves a module's parameters and buffers itself (``t.data = t.to(gpu)``),
    never through ``_apply``: the pattern and row indices follow ``blocks`` to its device when they
    are first needed, instead of a device-mismatch error in the first forward (the meta device
    stands in for the GPU)."""
    _, model = _pilora(supplementary_alpha=8.0)
    layers = {name: lora_layers(model)[name].lora_B["default"] for name in ("up", "down")}
    for module in model.modules():  # as fully_shard does: each tensor replaced, the module's _apply not called
        for key, p in module._parameters.items():
            module._parameters[key] = None if p is None else nn.Parameter(p.to("meta"), p.requires_grad)
        for key, b in module._buffers.items():
            module._buffers[key] = None if b is None else b.to("meta")
    assert all(B.pattern.device.type == "cpu" for B in layers.values())  # what fully_shard leaves behind
    out = model(X.to("meta"))
    assert out.device.type == "meta" and out.shape == (X.shape[0], 3)
    for name, B in layers.items():
        assert {t.device.type for t in B.derived_tensors()} == {"meta"}
        assert B.dominant.shape == (int(MASKS[name].sum()), 4) and B.dominant.device.type == "meta"


ADAPTER_NAME_PARTS = ("lora_", "dominant_mask", "magnitude_vector", "base_layer")


def _adapter_leftovers(model: nn.Module, reference: nn.Module) -> list[str]:
    """What of an adapter remains in ``model``, judged against the plain ``reference`` model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    bad = [
        f"module {name or '<root>'}: {type(mod).__name__}"
        for name, mod in model.named_modules()
        if isinstance(mod, (BaseTunerLayer, RowPartitionedB)) or type(mod).__module__.startswith("peft")
    ]
    bad += [
        f"tensor {name}"
        for name, _ in list(model.named_parameters()) + list(model.named_buffers())
        if any(p in name for p in ADAPTER_NAME_PARTS)
    ]
    got = {n: type(m) for n, m in model.named_modules()}
    want = {n: type(m) for n, m in reference.named_modules()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()), key=str)[:5]
        bad.append(f"module tree differs from the base model: {diff}")
    if {n: tuple(p.shape) for n, p in model.named_parameters()} != {
        n: tuple(p.shape) for n, p in reference.named_parameters()
    }:
        bad.append("parameters differ from the base model's")
    return bad


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA, max_position_embeddings=16, use_cache=False)
    return LlamaForCausalLM(cfg).eval(), ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("which", ["mlp", "llama"])
def test_merge_and_unload_leaves_exactly_the_base_model(which):
    """After merge_and_unload no PEFT layer, no RowPartitionedB and no adapter tensor is left, the
    module tree and parameter shapes are the base model's, and the output is the unmerged model's."""
    if which == "mlp":
        torch.manual_seed(0)
        base, targets = TinyMLP().eval(), ["up", "down"]
        x = X
    else:
        base, targets = _tiny_llama()
        x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    masks = {
        n: torch.rand(m.out_features, generator=torch.Generator().manual_seed(2)) < 0.4
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
    }
    cfg = MethodConfig(name="pilora", r=4, alpha=8, dropout=0.0, target_modules=targets, supplementary_r=1)
    model = prepare_model(copy.deepcopy(base), cfg, masks=masks)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter: non-zero B blocks
        for layer in lora_layers(model).values():
            B = layer.lora_B["default"]
            B.set_blocks(*(0.1 * torch.randn(t.shape, generator=g) for t in (B.dominant, B.supplementary)))
    model.eval()

    def out(m):
        with torch.no_grad():
            y = m(x)
        return y if isinstance(y, torch.Tensor) else y.logits

    found = _adapter_leftovers(model, base)  # the check sees an adapter that is there
    assert any("RowPartitionedB" in f for f in found) and any("lora_" in f for f in found)
    before = out(model)
    merged = model.merge_and_unload()
    assert _adapter_leftovers(merged, base) == []
    assert torch.allclose(out(merged), before, atol=1e-5)
    assert not torch.allclose(out(merged), out(base), atol=1e-5)  # the merge did change the weights


def test_gradient_checkpointing_gives_the_same_gradients():
    base, targets = _tiny_llama()
    masks = {
        n: torch.rand(m.out_features, generator=torch.Generator().manual_seed(2)) < 0.4
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
    }
    cfg = MethodConfig(name="pilora", r=4, alpha=8, dropout=0.0, target_modules=targets, supplementary_r=1)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same A
        model = prepare_model(copy.deepcopy(base), cfg, masks=masks).train()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                B = layer.lora_B["default"]
                B.set_blocks(*(0.1 * torch.randn(t.shape, generator=g) for t in (B.dominant, B.supplementary)))
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            assert model.base_model.model.is_activation_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:  # the recomputed forward forms the same products
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-8)


def test_trainer_save_model_writes_a_folder_stock_peft_and_load_adapter_both_read(tmp_path):
    """A PiLoRA model trained by a plain transformers.Trainer: ``save_model()`` (and every checkpoint)
    holds a stock rank r + r' LoRA that ``peft.PeftModel.from_pretrained`` loads with the model's
    outputs, and the compact form ``pilora.load_adapter`` rebuilds exactly (partition included).
    Each config file describes the tensors it sits beside; a checkpoint resumes exactly."""
    import json

    from safetensors.torch import load_file
    from transformers import Trainer

    torch.manual_seed(0)
    base = _WithLoss()
    cfg = MethodConfig(
        name="pilora",
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["up", "down"],
        supplementary_r=2,
        supplementary_alpha=2.0,
        modules_to_save=["head"],
    )
    model = prepare_model(copy.deepcopy(base), cfg, masks=MASKS)
    data = [{"x": X[i], "labels": Y[i]} for i in range(len(X))]
    args = _tiny_args(tmp_path / "run", max_steps=3, learning_rate=0.05, seed=0, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    model.eval()
    ours = model(X, Y)["logits"].detach()
    assert not torch.allclose(ours, base(X, Y)["logits"], atol=1e-3)  # the adapter (and the head) matter

    # what each file says is what the tensors beside it are
    stock_cfg = json.load(open(out / "adapter_config.json"))
    stock = load_file(str(out / "adapter_model.safetensors"))
    assert stock_cfg["peft_type"] == "LORA" and stock_cfg["r"] == stock_cfg["lora_alpha"] == 6
    assert {v.shape[0] for k, v in stock.items() if k.endswith("lora_A.weight")} == {6}
    assert {v.shape[1] for k, v in stock.items() if k.endswith("lora_B.weight")} == {6}
    pilora_cfg = json.load(open(out / "pilora_config.json"))
    assert pilora_cfg["peft_type"] == "PILORA" and pilora_cfg["r"] == 4 and pilora_cfg["supplementary_r"] == 2
    compact = load_file(str(out / "pilora_model.safetensors"))
    assert {v.shape[1] for k, v in compact.items() if k.endswith("lora_B.dominant")} == {4}
    assert {v.shape[1] for k, v in compact.items() if k.endswith("lora_B.supplementary")} == {2}
    assert not [f for f in os.listdir(out) if f.startswith(".pilora-save")]  # the scratch folder is gone

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert type(reloaded).__name__ == "PeftModel" and reloaded.peft_config["default"].r == 6
    assert torch.allclose(reloaded(X, Y)["logits"], ours, atol=1e-5)
    rebuilt = load_adapter(copy.deepcopy(base), str(out))
    assert torch.equal(rebuilt(X, Y)["logits"], ours)
    assert all(torch.equal(pilora_masks(rebuilt)[k], MASKS[k]) for k in MASKS)

    # the step-2 checkpoint was written the same way; the Trainer's own resume loads it exactly
    ckpt = tmp_path / "run" / "checkpoint-2"
    saved = load_adapter(copy.deepcopy(base), str(ckpt))
    fresh = prepare_model(copy.deepcopy(base), cfg, masks=MASKS)
    resumed = Trainer(model=fresh, args=args, train_dataset=data)
    resumed._load_from_checkpoint(str(ckpt))
    for a, b in zip(lora_layers(saved).values(), lora_layers(fresh).values()):
        assert torch.equal(a.lora_B["default"].blocks, b.lora_B["default"].blocks)
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)
    assert not torch.equal(
        lora_layers(saved)["up"].lora_B["default"].blocks, lora_layers(rebuilt)["up"].lora_B["default"].blocks
    )


def test_a_model_rebuilt_by_load_adapter_saves_the_same_folder_again(tmp_path):
    """load_adapter -> save_pretrained -> load_adapter is exact (the class that writes both forms
    survives a reload and a deepcopy)."""
    base, model = _pilora(supplementary_alpha=3.0)
    train_steps(model, X, Y, steps=2)
    save_adapter(model, str(tmp_path / "a"))
    again = copy.deepcopy(load_adapter(copy.deepcopy(base), str(tmp_path / "a")))
    again.save_pretrained(str(tmp_path / "b"))
    twice = load_adapter(copy.deepcopy(base), str(tmp_path / "b"))
    assert torch.equal(twice(X), model.eval()(X))
    assert PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).peft_config["default"].r == 5
