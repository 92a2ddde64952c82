import json

import torch
from helpers import FAST, compose_cfg, write_images

from pilora.methods.budget import matched_rank_pattern, pilora_module_count
from pilora.runner.train import train


def test_matched_ranks_against_hand_computed_counts():
    masks = {"up": torch.tensor([True] * 6 + [False] * 10), "down": torch.tensor([True] * 3 + [False] * 9)}
    shapes = {"up": (16, 10), "down": (12, 16)}
    pattern, budget = matched_rank_pattern(masks, shapes, r=4, r_s=1)
    # up: (4+1)·10 + 6·4 + 10·1 = 84 → 84/26 = 3.23 → k = 3 (78 params)
    # down: (4+1)·16 + 3·4 + 9·1 = 101 → 101/28 = 3.61 → k = 4 (112 params)
    assert pilora_module_count(16, 10, 6, 4, 1) == 84 and pilora_module_count(12, 16, 3, 4, 1) == 101
    assert pattern == {"up": 3, "down": 4}
    assert budget["pilora_adapter_params"] == 185 and budget["lora_adapter_params"] == 190
    assert budget["residual"] == 5


def test_matched_lora_run_records_its_budget(tmp_path):
    cfg = compose_cfg(
        FAST
        + write_images(str(tmp_path / "img"))
        + [
            "method=lora_matched",
            "method.r=4",
            "method.supplementary_r=1",
            "method.stage1.max_steps=3",
            "method.importance_interval=1",
            "trainer.max_steps=3",
        ],
        tmp_path / "run",
    )
    rec = train(cfg)
    b = rec["budget_match"]
    assert rec["method"] == "lora_matched" and b["ranks"]
    assert rec["params"]["adapter"] == b["lora_adapter_params"]  # the model really has those ranks
    from pilora import ImportanceStats

    shapes = [s.shape for s in ImportanceStats.load(b["importance_file"]).modules.values()]
    # rounding each module's rank moves it by at most half a rank step, (m + n) / 2 parameters
    assert abs(b["residual"]) <= sum((m + n) / 2 for m, n in shapes)
    assert len(b["ranks"]) == len(shapes) and all(k >= 1 for k in b["ranks"].values())
    # every module keeps the job's scale s = α/r = 2 at its own rank k (α = 2k), as PiLoRA's adapters do
    saved = json.load(open(tmp_path / "run" / "adapter" / "adapter_config.json"))
    assert saved["rank_pattern"] == b["ranks"] and saved["alpha_pattern"] == {k: 2.0 * v for k, v in b["ranks"].items()}
    from peft import PeftModel

    from pilora.peft_layers import lora_layers
    from pilora.tasks import make_task

    task = make_task(cfg.task, cfg.model, cfg.seed)
    layers = lora_layers(PeftModel.from_pretrained(task.build_model(), str(tmp_path / "run" / "adapter")))
    assert len(layers) == len(shapes) and {layer.scaling["default"] for layer in layers.values()} == {2.0}


def _lora_ranks(model):
    from pilora.peft_layers import lora_layers

    return {name: layer.lora_A["default"].weight.shape[0] for name, layer in lora_layers(model).items()}


def test_rank_pattern_on_a_tiny_model_gives_the_hand_computed_count(tiny_mlp):
    """PEFT really builds the matched ranks: up k=3, down k=4 (first test) → 3·(16+10) + 4·(12+16) = 190."""
    from pilora import MethodConfig, count_parameters, prepare_model

    masks = {"up": torch.tensor([True] * 6 + [False] * 10), "down": torch.tensor([True] * 3 + [False] * 9)}
    pattern, budget = matched_rank_pattern(masks, {"up": (16, 10), "down": (12, 16)}, r=4, r_s=1)
    model = prepare_model(
        tiny_mlp, MethodConfig(name="lora", r=4, alpha=8, target_modules=["up", "down"], rank_pattern=pattern)
    )
    assert _lora_ranks(model) == {"up": 3, "down": 4}
    assert count_parameters(model).adapter == 3 * (16 + 10) + 4 * (12 + 16) == 190 == budget["lora_adapter_params"]
    assert count_parameters(model).trainable == 190  # the head and the base weights stay frozen


def test_rank_pattern_on_a_tiny_llama_gives_the_hand_computed_count():
    """Dotted module names (layers.0 vs layers.1 share suffixes): every module gets its own rank.

    hidden 16, intermediate 32, r = 4, r' = 1; (m, n) = (out, in); PiLoRA count (r+r')·n + |M|·r + (m−|M|)·r':
      q_proj (16, 16), |M| = 8:  80 + 32 + 8  = 120 → 120/32 = 3.75 → k = 4 → 128
      v_proj (16, 16), |M| = 2:  80 + 8 + 14  = 102 → 102/32 = 3.19 → k = 3 →  96
      up_proj (32, 16), |M| = 16: 80 + 64 + 16 = 160 → 160/48 = 3.33 → k = 3 → 144
      down_proj (16, 32), |M| = 0: 160 + 0 + 16 = 176 → 176/48 = 3.67 → k = 4 → 192
    layer 1 takes layer 0's counts with q and v swapped: the same sums, other ranks per name.
    LoRA 2 × 560 = 1120 vs PiLoRA 2 × 558 = 1116: residual +4.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from pilora import MethodConfig, count_parameters, prepare_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=32,
        )
    )
    dominant = {"self_attn.q_proj": 8, "self_attn.v_proj": 2, "mlp.up_proj": 16, "mlp.down_proj": 0}
    masks, shapes = {}, {}
    for layer in (0, 1):
        for suffix, k in dominant.items():
            if layer == 1 and suffix in ("self_attn.q_proj", "self_attn.v_proj"):
                k = dominant["self_attn.v_proj" if suffix.endswith("q_proj") else "self_attn.q_proj"]
            name = f"model.layers.{layer}.{suffix}"
            shapes[name] = tuple(model.get_submodule(name).weight.shape)
            masks[name] = torch.arange(shapes[name][0]) < k
    pattern, budget = matched_rank_pattern(masks, shapes, r=4, r_s=1)
    assert budget["pilora_adapter_params"] == 1116 and budget["lora_adapter_params"] == 1120
    assert budget["residual"] == 4
    peft = prepare_model(
        model,
        MethodConfig(
            name="lora",
            r=4,
            alpha=8,
            dropout=0.0,
            rank_pattern=pattern,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        ),
    )
    ranks = {k.split("layers.", 1)[1]: v for k, v in _lora_ranks(peft).items()}
    assert ranks == {
        "0.self_attn.q_proj": 4,
        "0.self_attn.v_proj": 3,
        "0.mlp.up_proj": 3,
        "0.mlp.down_proj": 4,
        "1.self_attn.q_proj": 3,
        "1.self_attn.v_proj": 4,
        "1.mlp.up_proj": 3,
        "1.mlp.down_proj": 4,
    }
    assert count_parameters(peft).adapter == 1120
