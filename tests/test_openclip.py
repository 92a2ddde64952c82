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
    torch.manual_seed(3)
    ours = OpenCLIPImageClassifier(create_visual(oc), 5)
    torch.manual_seed(3)
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
    # one head for one seed, whichever backbone is built (GOAT's init: N(0, width^-0.5), bias 0)
    assert torch.equal(ours.classifier.weight, hf.classifier.weight) and not ours.classifier.bias.any()
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

    # python -m pilora.tasks.openclip <run>: the merged tower a stock open_clip visual loads
    import open_clip
    from safetensors.torch import load_file

    from pilora.tasks.openclip import main as export_main

    assert export_main([cfg.output_dir]) == 0
    tower = open_clip.create_model("tiny-vit-openclip", force_quick_gelu=True).visual.eval()
    tower.load_state_dict(load_file(os.path.join(cfg.output_dir, "openclip_visual.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.allclose(tower.transformer(tower._embeds(x)), compact.get_base_model().tokens(x), atol=1e-5)
    assert export_main([str(tmp_path / "nothing")]) == 1


TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8}}
TINY["text_cfg"] = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}


def _hf_tower_from(visual):
    """transformers' CLIPVisionModel (hidden_act quick_gelu, CLIP's own) holding ``visual``'s weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    blocks = visual.transformer.resblocks
    d = visual.transformer.width
    hf = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=d,
            intermediate_size=blocks[0].mlp.c_fc.out_features,
            num_hidden_layers=len(blocks),
            num_attention_heads=blocks[0].attn.num_heads,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    sd = {
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight,
        "pre_layrnorm.bias": visual.ln_pre.bias,
        "post_layernorm.weight": visual.ln_post.weight,
        "post_layernorm.bias": visual.ln_post.bias,
    }
    for i, b in enumerate(blocks):
        p = f"encoder.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[p + f"self_attn.{name}.weight"] = b.attn.in_proj_weight[j * d : (j + 1) * d]
            sd[p + f"self_attn.{name}.bias"] = b.attn.in_proj_bias[j * d : (j + 1) * d]
        for ours, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            mod = b.get_submodule(ours)
            sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = mod.weight, mod.bias
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and not missing
    return hf


@pytest.mark.parametrize("quick", [True, False])
def test_openclip_tower_computes_what_transformers_clip_computes_only_with_quick_gelu(quick):
    """OpenAI CLIP (and transformers' CLIP tower) is QuickGELU; with nn.GELU the same weights give
    other hidden states (the error the ``openai`` tag needs ``quick_gelu`` against)."""
    from pilora.tasks.openclip import create_visual

    torch.manual_seed(0)
    visual = create_visual({"openclip": {"name": f"cmp-vit-{quick}", "model_cfg": {**TINY, "quick_gelu": quick}}})
    visual.eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values, so a mapping mistake would show
        for name, p in visual.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = _hf_tower_from(visual)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state
        ours = visual.transformer(visual._embeds(x))
    diff = (ours - theirs).abs().max().item()
    if quick:
        assert diff < 1e-5
    else:
        assert diff > 1e-3


def test_quick_gelu_is_decided_as_open_clips_registry_decides(tmp_path, monkeypatch):
    """The ``openai`` tag is QuickGELU and LAION's is not (open_clip's registry, read, not copied); a
    tag is followed through open_clip.create_model itself (a registered tag whose file is local)."""
    import open_clip
    from open_clip import pretrained as registry

    from pilora.tasks.openclip import OpenCLIPImageClassifier, create_visual, quick_gelu

    assert quick_gelu({"openclip": {"name": "ViT-B-32", "pretrained": "openai"}})[0] is True
    assert quick_gelu({"openclip": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}})[0] is False
    assert quick_gelu({"openclip": {"name": "ViT-B-32-quickgelu", "pretrained": None}})[0] is True
    assert quick_gelu({"openclip": {"name": "ViT-B-32", "pretrained": "openai", "quick_gelu": False}})[0] is False
    with pytest.raises(ValueError, match="model.openclip.quick_gelu=true.*openai"):
        quick_gelu({"openclip": {"name": "ViT-B-32", "pretrained": str(tmp_path / "ViT-B-32.pt")}})

    # a tiny architecture registered with open_clip, and a tag for it marked as the OpenAI tags are
    create_visual({"openclip": {"name": "tag-vit", "model_cfg": TINY}})  # registers the config (GELU)
    ckpt = tmp_path / "tag-vit.pt"
    torch.manual_seed(1)
    torch.save(open_clip.create_model("tag-vit").state_dict(), ckpt)
    entries = {**registry._PRETRAINED, "tag-vit": {"openai": {"file": str(ckpt), "quick_gelu": True}}}
    monkeypatch.setattr(registry, "_PRETRAINED", entries)
    visual = create_visual({"openclip": {"name": "tag-vit", "pretrained": "openai"}})
    assert OpenCLIPImageClassifier(visual, 3).activation == "quick_gelu"
    weights = torch.load(ckpt)
    assert torch.equal(visual.conv1.weight, weights["visual.conv1.weight"])  # the tag's weights were loaded
    with pytest.raises(ValueError, match="checkpoint file"):  # the same weights as a file: say which
        create_visual({"openclip": {"name": "tag-vit", "pretrained": str(ckpt)}})
    plain = create_visual({"openclip": {"name": "tag-vit", "pretrained": str(ckpt), "quick_gelu": False}})
    assert OpenCLIPImageClassifier(plain, 3).activation == "gelu"


def test_the_record_names_the_activation(tmp_path):
    cfg = _cfg(tmp_path)
    task = make_task(cfg.task, cfg.model, 0)
    assert task.build_model().activation == "quick_gelu"
    assert task.protocol()["activation"] == "quick_gelu"
    assert task.protocol()["activation_decided_by"] == "model.openclip.model_cfg"


@pytest.mark.parametrize("method", ["lora", "pilora"])
def test_merged_export_loads_into_a_stock_open_clip_tower_and_gives_the_adapted_outputs(tmp_path, method):
    """q, k, v merged and packed back into in_proj_weight: a stock (unsplit) open_clip tower loads
    the export strictly and computes the adapted model's hidden states and head features."""
    import open_clip

    from pilora.tasks.clip import POOLING
    from pilora.tasks.openclip import OpenCLIPImageClassifier, create_visual, save_merged_visual

    oc = {"openclip": {"name": "export-vit", "model_cfg": {**TINY, "quick_gelu": True}}}
    torch.manual_seed(0)
    model = OpenCLIPImageClassifier(create_visual(oc), 4)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]
    masks = None
    if method == "pilora":
        g = torch.Generator().manual_seed(0)
        masks = {
            n: torch.rand(m.out_features, generator=g) < 0.5
            for n, m in model.named_modules()
            if n.split(".")[-1] in targets
        }
    cfg = MethodConfig(name=method, r=2, alpha=4, dropout=0.0, target_modules=targets, modules_to_save=["classifier"])
    if method == "pilora":
        cfg.supplementary_r = 1
    adapted = prepare_model(model, cfg, masks=masks).eval()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = adapted.get_base_model().tokens(x)
        logits = adapted(pixel_values=x).logits
    path = save_merged_visual(adapted, str(tmp_path / "visual.safetensors"))

    from safetensors.torch import load_file

    stock = open_clip.create_model("export-vit", force_quick_gelu=True).visual.eval()
    assert not torch.equal(stock.proj, adapted.get_base_model().image_projection)  # everything comes from the file
    stock.load_state_dict(load_file(path), strict=True)
    assert any(isinstance(m, nn.MultiheadAttention) for m in stock.modules())
    with torch.no_grad():
        theirs = stock.transformer(stock._embeds(x))
        head = adapted.get_base_model().classifier
        assert torch.allclose(theirs, tokens, atol=1e-5)
        assert torch.allclose(head(POOLING["mean_patch"](theirs, stock.ln_post)), logits, atol=1e-5)
        assert torch.equal(stock.proj, adapted.get_base_model().image_projection)
        assert torch.equal(adapted.get_base_model().tokens(x), tokens)  # the export left the model as it was
        with adapted.disable_adapter():
            assert not torch.allclose(adapted.get_base_model().tokens(x), tokens, atol=1e-3)  # the update mattered


def test_export_command_runs_as_a_module(tmp_path):
    """`python -m pilora.tasks.openclip <run>` itself: run as __main__, the module is loaded a second
    time as pilora.tasks.openclip (by the task that rebuilds the tower), and the two module objects
    hold two different OpenCLIPImageClassifier classes; calling main() in-process never sees that."""
    import subprocess
    import sys

    from pilora.runner.train import train

    cfg = _cfg(
        tmp_path,
        extra=[
            "method=lora",
            "trainer.max_steps=2",
            "trainer.save_strategy=no",
            "trainer.per_device_train_batch_size=6",
        ],
    )
    assert train(cfg)["status"] == "complete"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "pilora.tasks.openclip", cfg.output_dir],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(cfg.output_dir, "openclip_visual.safetensors")), proc.stdout
    assert "wrote" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-3000:]
