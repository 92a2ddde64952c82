"""LoRA-Dash: direction selection against hand computation, layer properties, runner end to end."""

import copy
import json
import math
import os
import shutil

import pytest
import torch
from conftest import SMALL_LLAMA, TinyMLP, train_steps
from helpers import FAST, compose_cfg, glue_overrides, interrupt_during_training
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState, TrainingArguments

from pilora import MethodConfig, count_parameters, prepare_model
from pilora.methods.lora_dash import (
    DashLaunchCallback,
    change_rates,
    dash_layers,
    export_as_lora,
    is_launched,
    launch,
    load_lora_dash,
    select_directions,
)
from pilora.paper_params import meta_count
from pilora.runner.train import train

X = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _rotation(theta):
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


# --------------------------------------------------------------------------- direction selection


def test_direction_selection_hand_computed():
    # W = Q diag(4, 2, 1) Pᵀ with known singular vectors; ΔW = Q D Pᵀ + (off-diagonal part, which
    # changes no singular value's projection). Hand: δ = (0.4, 0.5, 0.3), rates |δ|/σ = (0.1, 0.25, 0.3):
    # the smallest direction ranks first although its δ is the smallest: rates, not |δ|, decide.
    Q, P = _rotation(0.3), _rotation(-1.1).T @ _rotation(0.7)
    W = Q @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)) @ P.T
    D = torch.tensor([[0.4, 0.9, -0.7], [0.2, 0.5, 0.6], [-0.8, 0.1, 0.3]], dtype=torch.float64)
    delta = Q @ D @ P.T
    rate, _, S, _ = change_rates(W, delta)
    assert torch.allclose(S, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(rate, torch.tensor([0.1, 0.25, 0.3], dtype=torch.float64))
    index, U_s, Vh_s, _ = select_directions(W, delta, 2)
    assert index.tolist() == [2, 1]
    # the chosen pairs are W's: u_i v_iᵀ (sign-free) equals Q e_i (P e_i)ᵀ
    for j, i in enumerate((2, 1)):
        assert torch.allclose(torch.outer(U_s[:, j], Vh_s[j]), torch.outer(Q[:, i], P[:, i]), atol=1e-12)


def test_direction_selection_rectangular_against_brute_force():
    g = torch.Generator().manual_seed(0)
    W, delta = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    brute = torch.tensor([abs(float(U[:, i] @ delta @ Vh[i])) / float(S[i]) for i in range(5)], dtype=torch.float64)
    index, _, _, rate = select_directions(W, delta, 3)
    assert torch.allclose(rate, brute)
    assert index.tolist() == torch.argsort(brute, descending=True)[:3].tolist()


def test_more_directions_than_min_shape_is_refused():
    with pytest.raises(ValueError, match=r"min\(m, n\) = 10.*method.directions"):
        prepare_model(TinyMLP(), MethodConfig(name="lora_dash", r=2, target_modules=["up"], directions=11))
    with pytest.raises(ValueError, match="min"):
        select_directions(torch.randn(3, 4), torch.randn(3, 4), 4)


# ------------------------------------------------------------------------------- layer properties


def _dash_model(base, s=3, counts="optimizer_steps", t=100, dropout=0.0):
    return prepare_model(
        copy.deepcopy(base),
        MethodConfig(
            name="lora_dash",
            r=2,
            alpha=4,
            dropout=dropout,
            target_modules=["up", "down"],
            directions=s,
            prelaunch_steps=t,
            prelaunch_counts=counts,
        ),
    )


def _trained(base):
    model = _dash_model(base)
    train_steps(model, X, Y, steps=3)
    launch(model)
    train_steps(model, X, Y, steps=3)
    return model


def test_init_output_equals_base_and_only_adapter_and_coefficients_train():
    torch.manual_seed(0)
    base = TinyMLP()
    model = _dash_model(base)
    assert torch.equal(model(X), base(X)) or torch.allclose(model(X), base(X), atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.model.{m}.{k}"
        for m in ("up", "down")
        for k in ("lora_A.default.weight", "lora_B.default.weight", "lora_dash.default.coefficients")
    }
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = _trained(base)  # same base weights: trained is a separate copy; check it instead
    for n, p in trained.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    coefs = [l.lora_dash["default"].coefficients for l in dash_layers(trained).values()]
    assert all(c.abs().min() > 0 for c in coefs)  # the dash coefficients learned


def test_launch_keeps_output_and_selects_from_the_lora_update():
    torch.manual_seed(0)
    base = TinyMLP()
    model = _dash_model(base)
    train_steps(model, X, Y, steps=3)
    before = model(X)
    expected = {
        n: select_directions(l.get_base_layer().weight, l.get_delta_weight("default"), 3)[0].tolist()
        for n, l in dash_layers(model).items()
    }
    assert not is_launched(model)
    chosen = launch(model)
    assert is_launched(model)
    assert {n: v["index"] for n, v in chosen.items()} == expected
    assert torch.allclose(model(X), before, atol=1e-6)  # coefficients start at 0


def test_merge_equals_unmerged_and_unmerge_restores_base():
    torch.manual_seed(0)
    base = TinyMLP()
    model = _trained(base)
    out = model(X)
    W0 = {n: l.get_base_layer().weight.clone() for n, l in dash_layers(model).items()}
    model.merge_adapter()
    assert torch.allclose(model(X), out, atol=1e-5)
    model.unmerge_adapter()
    for n, l in dash_layers(model).items():
        assert torch.allclose(l.get_base_layer().weight, W0[n], atol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.allclose(merged(X), out, atol=1e-5)


def test_reload_and_export_equal_trained_model(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = TinyMLP()
    model = _trained(base)
    model.eval()
    out = model(X)
    model.save_pretrained(tmp_path / "dash")
    reloaded = load_lora_dash(copy.deepcopy(base), str(tmp_path / "dash"))
    assert torch.allclose(reloaded(X), out, atol=1e-6)
    assert is_launched(reloaded) and not any(p.requires_grad for p in reloaded.parameters())
    export_as_lora(model, str(tmp_path / "lora"))
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    assert torch.allclose(stock(X), out, atol=1e-5)
    assert stock.peft_config["default"].r == 2 + 3
    with pytest.raises(ValueError, match="not a LoRA-Dash adapter"):
        load_lora_dash(copy.deepcopy(base), str(tmp_path / "lora"))


def test_dash_gradients_dropped_before_launch_and_kept_after():
    torch.manual_seed(0)
    model = _dash_model(TinyMLP())
    cb = DashLaunchCallback(model, prelaunch_steps=1)  # _dash_model counts optimizer steps
    torch.nn.functional.cross_entropy(model(X), Y).backward()
    cb.on_pre_optimizer_step(None, None, None)
    assert all(l.lora_dash["default"].coefficients.grad is None for l in dash_layers(model).values())

    class State:
        global_step = 1

    cb.on_step_end(None, State(), None)
    assert cb.launch_step == 1 and is_launched(model)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(X), Y).backward()
    cb.on_pre_optimizer_step(None, None, None)
    assert all(l.lora_dash["default"].coefficients.grad.abs().sum() > 0 for l in dash_layers(model).values())


def _checkpointed_step(model, cb, opt, step):
    """One optimizer step with gradient checkpointing (non-reentrant): every layer runs its forward
    twice, once more in the backward's recomputation, as under the authors' --use_gradient_checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.nn.functional.cross_entropy(checkpoint(model, X, use_reentrant=False), Y).backward()
    cb.on_pre_optimizer_step(None, None, None)
    grads = [l.lora_dash["default"].coefficients.grad for l in dash_layers(model).values()]
    opt.step()
    opt.zero_grad()
    cb.on_step_end(None, TrainerState(global_step=step, max_steps=10), None)
    return grads


def test_layer_calls_launch_where_the_authors_flag_does(tmp_path):
    """The authors' t counts a layer's forward calls (FLAG): with gradient checkpointing two per
    optimizer step, so t = 4 launches in the first forward of step 3, from the update after 2 steps,
    and the coefficients get a gradient in that same step 3. Eval forwards count too."""
    torch.manual_seed(0)
    model = _dash_model(TinyMLP(), counts="layer_calls", t=4)
    cb = DashLaunchCallback(model, prelaunch_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path), activation_checkpointing=True, use_cpu=True, report_to=[])
    cb.on_train_begin(args, TrainerState(global_step=0, max_steps=10), None)  # 10 steps x 2 calls: t = 4 fits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        grads = _checkpointed_step(model, cb, opt, step)
        assert all(g is None for g in grads) and not is_launched(model) and cb.launch_step is None
    assert all(int(l.lora_dash["default"].calls) == 4 for l in dash_layers(model).values())
    expected = {
        n: select_directions(l.get_base_layer().weight, l.get_delta_weight("default"), 3)[0].tolist()
        for n, l in dash_layers(model).items()
    }
    grads = _checkpointed_step(model, cb, opt, 3)
    assert is_launched(model) and cb.launch_step == 3
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # trained on the launch step itself
    assert cb.summary()["directions"] == expected and cb.summary()["prelaunch_counts"] == "layer_calls"

    # an evaluation forward is a call too: 1 step (2 calls) + 2 eval calls = 4, step 2 launches
    torch.manual_seed(0)
    model = _dash_model(TinyMLP(), counts="layer_calls", t=4)
    cb = DashLaunchCallback(model, prelaunch_steps=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _checkpointed_step(model, cb, opt, 1)
    model.eval()
    with torch.no_grad():
        model(X)
        model(X)
    model.train()
    assert not is_launched(model)
    _checkpointed_step(model, cb, opt, 2)
    assert cb.launch_step == 2


def test_dash_branch_draws_its_own_dropout_mask():
    """The authors' forward calls self.lora_dropout(x) once for the LoRA branch and again for the
    dash branch: two independent masks."""
    torch.manual_seed(0)
    model = _dash_model(TinyMLP(), dropout=0.5)
    train_steps(model, X, Y, steps=2)
    launch(model)
    layer = next(iter(dash_layers(model).values()))
    dash = layer.lora_dash["default"]
    with torch.no_grad():
        dash.coefficients.fill_(1.0)
    model.train()
    x = torch.randn(8, layer.in_features, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    drop = layer.lora_dropout["default"]
    x1, x2 = drop(x), drop(x)
    lora = lambda z: layer.lora_B["default"](layer.lora_A["default"](z)) * layer.scaling["default"]  # noqa: E731
    base = layer.get_base_layer()(x)
    assert torch.allclose(got, base + lora(x1) + dash(x2), atol=1e-6)
    assert not torch.allclose(got, base + lora(x1) + dash(x1), atol=1e-3)  # not one shared mask


# ------------------------------------------------------------------------------ parameter accounting


def test_exact_counts_tiny_llama_and_paper_settings():
    cfg = LlamaConfig(**SMALL_LLAMA)
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    model = prepare_model(
        LlamaForCausalLM(cfg), MethodConfig(name="lora_dash", r=4, target_modules=targets, directions=3)
    )
    per_layer = 4 * (32 + 32) + 2 * 4 * (32 + 16) + 2 * 4 * (32 + 48) + 5 * 3
    c = count_parameters(model)
    assert c.adapter == c.trainable == 2 * per_layer
    # Table 1: the same share as LoRA; s = 8 coefficients in each of the 160 target layers
    for setting, lora, share in (("LLaMA2-7B", 56_098_816, 0.83), ("LLaMA3-8B", 56_623_104, 0.70)):
        c = meta_count(setting, "lora_dash")
        assert c.adapter == c.trainable == lora + 160 * 8
        assert round(100 * c.adapter_share, 2) == share


# ------------------------------------------------------------------------------------ end to end


def _dash_run(tmp_path, *extra):
    return (
        FAST
        + glue_overrides(tmp_path / "data")
        + ["method=lora_dash", "method.prelaunch_steps=4", "method.directions=4", "trainer.num_train_epochs=3", *extra]
    )


@pytest.mark.slow
def test_glue_end_to_end_launches_learns_and_resumes(tmp_path):
    overrides = _dash_run(tmp_path)
    rec = train(compose_cfg(overrides, tmp_path / "run"))
    assert rec["status"] == "complete" and rec["method"] == "lora_dash"
    info = rec["lora_dash"]
    # the authors' count: 4 calls of each layer (96 / 16 = 6 steps an epoch, one call each, the
    # evaluation only after step 6), so the 5th call, in step 5, launches
    assert info["prelaunch_steps"] == 4 and info["launch_step"] == 5 and info["prelaunch_counts"] == "layer_calls"
    assert info["directions"] and all(len(v) == 4 for v in info["directions"].values())
    saved = torch.load(info["directions_file"])
    assert saved["step"] == 5 and {k: v["index"] for k, v in saved["modules"].items()} == info["directions"]
    losses = rec["train_loss"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert rec["metrics"]["best"]["eval_accuracy"] > 0.75
    assert 0 < rec["params"]["share"] < 1
    # the native adapter holds the launched directions and learned coefficients
    from safetensors.torch import load_file

    state = load_file(os.path.join(tmp_path / "run", "adapter_lora_dash", "adapter_model.safetensors"))
    coef = [v for k, v in state.items() if k.endswith("lora_dash.coefficients")]
    assert coef and all(c.abs().sum() > 0 for c in coef)
    index = {
        k[len("base_model.model.") : -len(".lora_dash.direction_index")]: v.tolist()
        for k, v in state.items()
        if k.endswith("lora_dash.direction_index")
    }
    assert index == info["directions"]
    # adapter/ is the stock export: PEFT's own loader (a rerun's evaluation, lm-eval) gives the
    # trained model, dash term included; PEFT's loader on the native form would drop that term
    from peft import PeftModel

    from pilora.tasks import make_task

    cfg = compose_cfg(overrides, tmp_path / "run")
    task = make_task(cfg.task, cfg.model, cfg.seed)
    batch = task.datasets()["validation"][:16]
    inputs = {k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = load_lora_dash(task.build_model(), str(tmp_path / "run" / "adapter_lora_dash"))(**inputs).logits
        got = PeftModel.from_pretrained(task.build_model(), str(tmp_path / "run" / "adapter"))(**inputs).logits
        plain = PeftModel.from_pretrained(task.build_model(), str(tmp_path / "run" / "adapter_lora_dash"))(
            **inputs
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # (a few dash steps move the logits little here, but far more than the export's rounding)
    assert (plain - want).abs().max() > 20 * (got - want).abs().max()
    stock = json.load(open(tmp_path / "run" / "adapter" / "adapter_config.json"))
    assert stock["r"] == cfg.method.r + cfg.method.directions  # A = [A; V_sᵀ], B = [s·B, U_s diag(c)]
    # interrupted after the launch (epoch 2's checkpoint dropped): the rerun resumes past the launch
    out = tmp_path / "run"
    ckpts = sorted(os.listdir(out / "train"), key=lambda s: int(s.split("-")[-1]))
    shutil.rmtree(out / "train" / ckpts[-1])
    interrupt_during_training(out)
    resumed = train(compose_cfg(overrides, out))
    assert resumed["lora_dash"]["directions"] == info["directions"]
    assert resumed["lora_dash"]["launch_step"] == info["launch_step"] == 5  # the step, not t = 4 layer calls
    assert resumed["metrics"]["final"]["eval_loss"] == pytest.approx(rec["metrics"]["final"]["eval_loss"], rel=1e-5)


def test_prelaunch_longer_than_run_is_refused(tmp_path):
    steps = ["method.prelaunch_steps=50", "trainer.max_steps=2", "method.prelaunch_counts=optimizer_steps"]
    with pytest.raises(ValueError, match=r"method.prelaunch_steps=50.*\(2 optimizer steps\)"):
        train(compose_cfg(_dash_run(tmp_path, *steps), tmp_path / "run"))
    calls = ["method.prelaunch_steps=50", "trainer.max_steps=2"]
    with pytest.raises(ValueError, match=r"method.prelaunch_steps=50.*\(2 forward calls of each layer"):
        train(compose_cfg(_dash_run(tmp_path, *calls), tmp_path / "run2"))
    with pytest.raises(ValueError, match="layer_calls"):
        MethodConfig(name="lora_dash", prelaunch_counts="epochs")
