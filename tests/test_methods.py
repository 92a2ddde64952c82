import copy
from dataclasses import replace

import pytest
import torch
from conftest import SMALL_LLAMA, TinyMLP, train_steps
from transformers import LlamaConfig, LlamaForCausalLM

from pilora import METHODS, MethodConfig, count_parameters, prepare_model
from pilora.peft_layers import lora_layers

X = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(METHODS))  # every registered method
def test_every_method_preserves_output_at_init_and_trains(name):
    torch.manual_seed(0)
    base = TinyMLP()
    model = prepare_model(
        copy.deepcopy(base), MethodConfig(name=name, r=2, alpha=4, dropout=0.0, target_modules=["up", "down"])
    )
    assert torch.allclose(model(X), base(X), atol=1e-5)
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    train_steps(model, X, torch.zeros(8, dtype=torch.long), steps=2)
    assert any(not torch.equal(v, before[k]) for k, v in model.named_parameters() if v.requires_grad)


def test_milora_uses_smallest_singular_triplets_and_pissa_the_largest():
    torch.manual_seed(0)
    base = TinyMLP()
    W = base.up.weight.detach().clone()
    S = torch.linalg.svdvals(W)
    for name, expected in (("milora", S[-2:]), ("pissa", S[:2])):
        # alpha = 4, r = 2: scaling s = 2, so an init that forgot to divide Σ by s would be off by 2x
        model = prepare_model(copy.deepcopy(base), MethodConfig(name=name, r=2, alpha=4, target_modules=["up"]))
        layer = lora_layers(model)["up"]
        delta = layer.get_delta_weight("default")  # s·B·A
        assert torch.allclose(torch.linalg.svdvals(delta)[:2], expected, atol=1e-4)
        assert torch.allclose(layer.get_base_layer().weight + delta, W, atol=1e-5)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.allclose(A.norm(), B.norm(), rtol=1e-4)  # √(Σ/s) in both factors, as PEFT's PiSSA


@pytest.mark.parametrize("target", [r".*\.attn\.c_proj", r".*\.mlp\.c_proj"])  # square, and 4d × d
def test_milora_on_conv1d_layers_reads_the_weight_transposed(target):
    """GPT-2's Conv1D stores W0 as n × m (PEFT's fan_in_fan_out): MiLoRA must take the triplets of
    W0, not of its transpose (the output at init would change, or the shapes would not fit)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 8))
    want = base(ids).logits
    for name in ("milora", "pissa"):
        model = prepare_model(
            copy.deepcopy(base), MethodConfig(name=name, r=2, alpha=4, dropout=0.0, target_modules=target)
        ).eval()
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)


def test_milora_warns_when_a_half_precision_residual_loses_the_minor_component(caplog):
    """bfloat16 W_res = W0 − s·B·A cannot hold W0's smallest triplets: said once, with the fix."""
    import pilora.methods.svd as svd

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(torch.bfloat16)
    svd._warned = False
    with caplog.at_level("WARNING", logger="pilora"):
        prepare_model(layer, MethodConfig(name="milora", r=8, alpha=16, target_modules=["0"]))
    assert "MiLoRA: rounding W_res = W0 - s·B·A to bfloat16 loses" in caplog.text
    assert "model.dtype=float32" in caplog.text
    caplog.clear()
    svd._warned = False
    with caplog.at_level("WARNING", logger="pilora"):
        prepare_model(
            torch.nn.Sequential(torch.nn.Linear(256, 256)), MethodConfig(name="milora", r=8, target_modules=["0"])
        )
    assert "MiLoRA" not in caplog.text  # float32: exact to float error, nothing to say


def test_unknown_target_module_lists_linear_layers():
    with pytest.raises(ValueError, match=r"\['down', 'head', 'up'\]"):
        prepare_model(TinyMLP(), MethodConfig(target_modules=["q_proj"]))


def test_a_misspelled_module_to_save_is_named_not_left_frozen():
    """PEFT ignores a modules_to_save name that matches nothing: the head would not train."""
    cfg = dict(name="lora", r=2, target_modules=["up"])
    with pytest.raises(ValueError, match=r"modules_to_save names \['haed'\].*\['down', 'head', 'up'\]"):
        prepare_model(TinyMLP(), MethodConfig(**cfg, modules_to_save=["haed"]))
    model = prepare_model(TinyMLP(), MethodConfig(**cfg, modules_to_save=["head"]))
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and "head" in n]
    assert head and all(p.requires_grad for p in head)  # spelled right, the head trains


class _Nested(torch.nn.Module):
    """TinyMLP one level down: its linears' whole names are block.up, block.down, block.head."""

    def __init__(self):
        super().__init__()
        self.block = TinyMLP()


@pytest.mark.parametrize(
    "model, targets, match",
    [
        # `method.target_modules=qury`: a string, which PEFT reads as a regex of whole module names
        (TinyMLP, "qury", r"target modules 'qury' match no linear layer of TinyMLP; .* named \['down', 'head', 'up'\]"),
        # a layer's leaf name as a string matches no whole name one level down: say how to match by name
        (_Nested, "up", r"'up' match no linear layer of _Nested.*'block\.up'.*method\.target_modules=\[up\]"),
        (_Nested, "up|down", r"'up\|down' match no linear layer.*\['down', 'head', 'up'\]"),
        (TinyMLP, "up[", r"'up\[' is not a valid regular expression.*\['down', 'head', 'up'\]"),
        (TinyMLP, [], r"target modules is an empty list: no layer would be adapted.*\['down', 'head', 'up'\]"),
        (TinyMLP, "", r"target modules is an empty string.*\['down', 'head', 'up'\]"),
    ],
)
def test_string_or_empty_target_modules_list_linear_layers(model, targets, match):
    """A string or empty target_modules used to end in PEFT's NoMatchingPeftModuleError (or re.error),
    which names neither the model's layers nor the fix."""
    with pytest.raises(ValueError, match=match):
        prepare_model(model(), MethodConfig(target_modules=targets))


@pytest.mark.parametrize(
    "model, targets, adapted",
    [
        (TinyMLP, "up", ["up"]),
        (TinyMLP, "up|down", ["down", "up"]),
        (_Nested, ".*\\.(up|down)", ["block.down", "block.up"]),
        (_Nested, "all-linear", ["block.down", "block.head", "block.up"]),
        (_Nested, ["up"], ["block.up"]),
    ],
)
def test_valid_target_module_strings_adapt_what_peft_matches(model, targets, adapted):
    assert sorted(lora_layers(prepare_model(model(), MethodConfig(target_modules=targets)))) == adapted


def test_methods_registry_and_exact_llama_counts():
    assert set(METHODS) >= {"lora", "rslora", "dora", "pissa", "milora", "pilora"}
    cfg = LlamaConfig(**SMALL_LLAMA)
    model = prepare_model(
        LlamaForCausalLM(cfg), MethodConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    )
    per_layer = 4 * (32 + 32) + 2 * 4 * (32 + 16) + 2 * 4 * (32 + 48)
    c = count_parameters(model)
    assert c.adapter == c.trainable == 2 * per_layer
    assert c.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["pissa", "milora"])
def test_svd_init_refuses_a_rank_above_the_weights_singular_triplets(name):
    """TinyMLP's ``up`` is 16×10: 10 singular triplets. r = 10 builds; r = 11 is named before any
    training (PEFT's PiSSA would build a short adapter that fails only when saved)."""
    up = TinyMLP().up.weight.shape
    prepare_model(TinyMLP(), MethodConfig(name=name, r=min(up), target_modules=["up"]))
    with pytest.raises(ValueError, match=rf"r = {min(up) + 1} .* {up[0]}×{up[1]} target has only {min(up)}"):
        prepare_model(TinyMLP(), MethodConfig(name=name, r=min(up) + 1, target_modules=["up"]))


@pytest.mark.parametrize("method", ["pilora", "lora_matched"])
@pytest.mark.parametrize("r", [24, 28, 30, 32])
def test_fig5_stage1_is_the_rank_32_alpha_64_lora_at_every_dominant_rank(method, r):
    """Fig. 5 sweeps the dominant rank with stage 1 at "the rank of 32 used in the initial
    adaptation phase" (Tab. 5: α = 64): every point, PiLoRA's or the budget match's, must build that
    same stage-1 LoRA (scale 2), and stage 2 its own rank at α = 2r."""
    from helpers import compose_cfg

    from pilora.runner.train import method_config

    cfg = method_config(compose_cfg(["experiment=fig5_rank", f"method={method}", f"method.r={r}", "model=tiny-llama"]))
    assert (cfg.r, cfg.alpha, cfg.stage1_r) == (r, 2 * r, 32)
    base = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA))
    cfg = replace(cfg, target_modules=["q_proj", "v_proj"])
    stages = [(1, 32, 64.0)] + ([(None, r, 2.0 * r)] if method == "lora_matched" else [])  # PiLoRA's stage 2: masks
    for stage, want_r, want_alpha in stages:
        layers = lora_layers(prepare_model(copy.deepcopy(base), cfg, stage=stage))
        assert len(layers) == 2 * SMALL_LLAMA["num_hidden_layers"]
        for layer in layers.values():
            assert (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]) == (
                want_r,
                want_alpha,
                2.0,
            )
