"""Full fine-tuning (method=full): every weight trains through the same runner, records and tables."""

import copy
import os

import pytest
import torch
from conftest import TinyMLP, train_steps
from helpers import FAST, compose_cfg, glue_overrides, table_rows
from transformers import TrainingArguments

from pilora import MethodConfig, count_parameters, prepare_model
from pilora.methods.full import check_full_finetune_fsdp
from pilora.paper_params import meta_count
from pilora.runner.train import train


def test_full_trains_every_weight_and_counts_100_percent():
    torch.manual_seed(0)
    base = TinyMLP()
    for p in base.parameters():  # a pretrained model arrives frozen or not: full FT trains it all
        p.requires_grad_(False)
    model = prepare_model(copy.deepcopy(base), MethodConfig(name="full"))
    c = count_parameters(model)
    assert c.trainable == c.total == c.adapter == sum(p.numel() for p in base.parameters())
    assert c.share == c.adapter_share == c.adapter_share_of_backbone == 1.0
    x = torch.randn(8, 10)
    assert torch.equal(model(x), base(x))
    train_steps(model, x, torch.zeros(8, dtype=torch.long), steps=2)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


@pytest.mark.filterwarnings("ignore")
def test_paper_settings_full_counts():
    c = meta_count("LLaMA2-7B", "full")
    assert c.trainable == c.adapter == 6_738_415_616 and round(100 * c.adapter_share, 2) == 100.0


@pytest.mark.parametrize(
    "family,task,model,lr,per_device,accumulation,epochs",
    [
        # GOAT vit.sh (lora=ft): totalbz 512 (64 per device), lr 1e-4, the eps table
        ("vision", "vision/cars", "clip-vit-b32", 1e-4, 64, 8, 35),
        ("vision", "vision/svhn", "clip-vit-b32", 1e-4, 64, 8, 4),
        # GOAT glue.sh (lora=ft): totalbz 256 (32 per device), lr 1e-5, 10 epochs (RTE 50)
        ("glue", "glue/rte", "roberta-large", 1e-5, 32, 8, 50),
        ("glue", "glue/sst2", "roberta-large", 1e-5, 32, 8, 10),
    ],
)
def test_full_finetuning_gets_goats_own_settings_per_family(family, task, model, lr, per_device, accumulation, epochs):
    """method=full composes tuned/<family>/full.yaml on top of the task's tuned file: GOAT's
    vit.sh / glue.sh with train_*.py's TrainingArguments (warmup_ratio 0.03 with warmup_steps 0,
    bf16, no weight decay, cosine). The adapter methods keep the paper's Tab. 6/7 settings, in bf16
    as train_*.py trains every method."""
    full = compose_cfg([f"task={task}", "method=full", f"model={model}"]).trainer
    assert (full.learning_rate, full.per_device_train_batch_size, full.gradient_accumulation_steps) == (
        lr,
        per_device,
        accumulation,
    )
    assert full.num_train_epochs == epochs and full.bf16 is True and full.weight_decay == 0.0
    assert full.lr_scheduler_type == "cosine"
    args = TrainingArguments("/tmp/unused", warmup_steps=full.warmup_steps, report_to=[])
    assert args.get_warmup_steps(1000) == 30 and args.get_warmup_steps(101) == 4  # ceil(3 %), as GOAT's 4.x
    for method in ("lora", "pilora", "lora_matched", "dora"):
        other = compose_cfg([f"task={task}", f"method={method}", f"model={model}"]).trainer
        assert other.gradient_accumulation_steps == 1 and other.warmup_steps == 100 and other.bf16 is True
        assert other.learning_rate != 1e-5 and other.per_device_train_batch_size == 64


def test_fsdp_keys_full_finetuning_cannot_use_are_refused(tmp_path):
    """Checked on the TrainingArguments transformers builds from the keys (it adds its own defaults
    to fsdp_config, which must pass)."""
    model = TinyMLP()

    def args(**kw):
        return TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], **kw)

    with pytest.raises(ValueError, match=r"transformer_layer_cls_to_wrp.*did you mean transformer_layer_cls_to_wrap"):
        check_full_finetune_fsdp(args(fsdp=True, fsdp_config={"transformer_layer_cls_to_wrp": ["X"]}), model)
    with pytest.raises(ValueError, match=r"\['LlamaDecoderLayer'\].*TinyMLP does not contain"):
        check_full_finetune_fsdp(
            args(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}), model
        )
    # a usable config, and no FSDP at all, pass
    check_full_finetune_fsdp(
        args(fsdp=True, fsdp_config={"version": 2, "min_num_params": 0, "transformer_layer_cls_to_wrap": ["Linear"]}),
        model,
    )
    check_full_finetune_fsdp(args(fsdp_config={"nonsense": 1}), model)


@pytest.mark.slow
def test_glue_full_finetune_end_to_end(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    overrides = (
        FAST
        + glue_overrides(tmp_path / "data")
        + ["method=full", "trainer.learning_rate=2e-4", "trainer.num_train_epochs=3"]
        # tuned/glue/full.yaml's GOAT batch (32 x 8 accumulation) and bf16 do not fit 96 CPU examples
        + ["trainer.gradient_accumulation_steps=1", "trainer.bf16=false"]
    )
    cfg = compose_cfg(overrides, tmp_path / "run")
    rec = train(cfg)
    assert rec["status"] == "complete" and rec["method"] == "full"
    p = rec["params"]
    assert p["trainable"] == p["total"] == p["adapter"] and p["share"] == p["adapter_share"] == 1.0
    assert rec["metrics"]["best"]["eval_accuracy"] > 0.75
    assert rec["peak_memory_mb"] > 0 and rec["timing"]["train_s"] > 0  # the cost table's inputs
    losses = rec["train_loss"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    # the saved model is the whole model, and every pretrained encoder matrix moved
    saved = load_file(os.path.join(tmp_path / "run", "model", "model.safetensors"))
    pretrained = AutoModel.from_pretrained(cfg.model.path).state_dict()
    moved = [
        k
        for k, v in pretrained.items()
        if v.ndim == 2 and "embeddings" not in k and not torch.equal(saved[next(s for s in saved if s.endswith(k))], v)
    ]
    assert len(moved) == sum(1 for k, v in pretrained.items() if v.ndim == 2 and "embeddings" not in k)


def test_tables_show_our_run_on_the_cited_rows(tmp_path):
    """The LoRA-Dash and Full FT rows are cited (†) in the paper: our run fills "ours" when one
    exists, otherwise the cell reads "— / <cited number>"."""
    from test_tables_honest import write

    from analysis.records import load_records
    from analysis.tables import render

    root = str(tmp_path / "vision")
    for seed in (0, 1):
        write(
            root,
            "full",
            "eurosat",
            seed,
            test={"test_accuracy": 0.981 + seed * 0.002},
            model="clip-vit-b32",
            family="vision",
            cfg={"name": "full"},
            extra={"params": {"trainable": 10, "total": 10, "adapter": 10, "adapter_share": 1.0}},
        )
    text = render(load_records(root), tables=["3", "1"], cost=True)
    (full,) = table_rows(text, "CLIP ViT-B/32", "Full FT †")
    assert full[2] == "100.00 / 100"
    assert "98.20 ± 0.14 (n=2) / 98.96" in full  # ours / the † number
    assert "— / 60.33" in full  # no run on Cars: the cited number only
    (dash,) = table_rows(text, "LLaMA2-7B", "LoRA-Dash †")
    assert dash[3] == "— / 71.0"
    assert "Full FT" in text.split("Cost")[-1]  # its time and memory sit in the cost table
