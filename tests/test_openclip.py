"""model=*-openclip: the CLIP tower built by open_clip, its attention split into LoRA-able linears."""

import copy
import os

import pytest
import torch
from helpers import FAST, compose_cfg, write_images
from torch import nn

from pilora import MethodConfig, count_parameters, prepare_model
from pilora.peft_layers import lora_layers
from pilora.tasks import make_task
from pilora.tasks.openclip import SplitAttention, split_attention


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    with torch.no_grad():  # non-zero biases, so a mix-up of the q/k/v chunks would show
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    split = SplitAttention(mha).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    causal = torch.triu(torch.full((7, 7), float("-inf")), 1)
    for mask in (None, causal, causal.isinf()):
        ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert torch.allclose(split(x, x, x, need_weights=False, attn_mask=mask)[0], ref, atol=1e-6)


def _cfg(tmp_path, model="tiny-clip-openclip", extra=()):
    return compose_cfg(FAST + write_images(str(tmp_path / "img")) + [f"model={model}", *extra], tmp_path / "out")


def test_openclip_tower_is_output_identical_after_the_split_and_has_six_targets_per_block(tmp_path):
    from pilora.tasks.openclip import create_visual

    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    visual = create_visual(cfg.model).eval()
    x = torch.randn(2, 3, 32, 32)
    before = visual(x)
    assert split_attention(visual) == 2 and not any(isinstance(m, nn.MultiheadAttention) for m in visual.modules())
    assert torch.allclose(visual(x), before, atol=1e-5)

    task = make_task(cfg.task, cfg.model, 0)
    model = task.build_model()
    lora = prepare_model(
        model,
        MethodConfig(name="lora", r=2, target_modules=list(cfg.model.target_modules), modules_to_save=["classifier"]),
    )
    names = sorted(lora_layers(lora))
    assert len(names) == 2 * 6
    assert {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"}


def test_openclip_and_transformers_towers_count_the_same_parameters():
    """Same shapes -> same total and adapter counts (the head and the accounting are shared)."""
    from transformers import CLIPVisionConfig

    from pilora.tasks.clip import CLIPImageClassifier
    from pilora.tasks.openclip import OpenCLIPImageClassifier, create_visual

    oc = {
        "openclip": {
            "name": "count-vit",
            "model_cfg": {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
            },
        }
    }
    ours = OpenCLIPImageClassifier(create_visual(oc), 5)
    hf = CLIPImageClassifier.from_config(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        5,
    )
    a = count_parameters(
        prepare_model(
            ours,
            MethodConfig(
                name="lora",
                r=8,
                target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
                modules_to_save=["classifier"],
            ),
        )
    )
    b = count_parameters(
        prepare_model(
            hf,
            MethodConfig(
                name="lora",
                r=8,
                target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                modules_to_save=["classifier"],
            ),
        )
    )
    assert (a.total, a.adapter, a.trainable) == (b.total, b.adapter, b.trainable)
    assert a.adapter == 2 * 8 * (4 * (32 + 32) + (32 + 128) + (128 + 32))


def test_pilora_trains_on_the_openclip_tower_and_its_adapter_loads_in_stock_peft(tmp_path):
    from peft import PeftModel

    from pilora.runner.train import train

    cfg = _cfg(
        tmp_path,
        extra=[
            "method=pilora",
            "method.stage1.max_steps=3",
            "method.importance_interval=1",
            "trainer.max_steps=4",
            "trainer.save_strategy=no",
            "trainer.learning_rate=5e-3",
            "trainer.per_device_train_batch_size=6",
        ],
    )
    rec = train(cfg)
    assert rec["status"] == "complete" and rec["model"] == "tiny-clip-openclip"
    assert len(rec["pilora"]["dominant_fraction_per_module"]) == 12
    assert rec["train_loss"][-1] < rec["train_loss"][0]

    task = make_task(cfg.task, cfg.model, 0)
    torch.manual_seed(0)
    base = task.build_model()
    stock = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(cfg.output_dir, "adapter")).eval()
    from pilora import load_adapter

    compact = load_adapter(copy.deepcopy(base), os.path.join(cfg.output_dir, "adapter_pilora")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(stock(pixel_values=x).logits, compact(pixel_values=x).logits, atol=1e-5)
    assert not torch.allclose(base.eval()(pixel_values=x).logits, compact(pixel_values=x).logits, atol=1e-4)
