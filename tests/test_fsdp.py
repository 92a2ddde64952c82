"""FSDP on this machine: 2 CPU ranks (torchrun, gloo) train the tiny LLaMA sharded by
``transformers.Trainer`` / accelerate's FSDP2 (``fully_shard`` per ``LlamaDecoderLayer`` on a gloo
mesh), configured as a user would (``+trainer.fsdp=true +trainer.fsdp_config={...}``), and must
match one process with the same global batch.

accelerate 1.15 turns the FSDP plugin into FSDP only on accelerator ranks: on CPU ranks it prepares
DDP without a word, which the runner now refuses (tested below). The multi-process tests therefore
launch ``tests/fsdp_cpu_run.py``, which adds MULTI_CPU to accelerate's FSDP branch and changes
nothing else. Measured here (Adam eps 1e-6: helpers.ROUNDING_STABLE_ADAM): losses agree to ~1e-7
relative, weights and exported adapters to ~5e-7 absolute.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import FAST, ROUNDING_STABLE_ADAM, compose_cfg, write_commonsense
from safetensors.torch import load_file

from pilora.paper_params import SETTINGS, fsdp_estimate, fsdp_memory_per_gpu, fsdp_units, meta_count
from pilora.runner.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
FSDP = ["+trainer.fsdp=true", "+trainer.fsdp_config={version: 2, transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}"]


def _base(data):
    return (
        FAST
        + write_commonsense(str(data))
        + [
            "trainer.num_train_epochs=1",
            "trainer.max_steps=3",
            "trainer.per_device_eval_batch_size=4",
            "method.dropout=0",
            ROUNDING_STABLE_ADAM,
        ]
    )


def _fsdp_torchrun(overrides, out):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [os.path.join(ROOT, "tests", "fsdp_cpu_run.py"), *overrides, *FSDP, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(os.path.join(out, "results.json")))


def _same_record(sharded, one):
    assert sharded["status"] == one["status"] == "complete"
    assert sharded["world_size"] == 2 and one["world_size"] == 1
    assert sharded["steps"] == one["steps"] == 3
    assert sharded["params"] == one["params"]
    assert sharded["pilora"] is None or (
        sharded["pilora"]["dominant_fraction_per_module"] == one["pilora"]["dominant_fraction_per_module"]
    )
    torch.testing.assert_close(torch.tensor(sharded["train_loss"]), torch.tensor(one["train_loss"]), rtol=TOL, atol=0)
    for part in ("final", "test"):
        for key, value in one["metrics"][part].items():
            if key.endswith(("loss", "accuracy", "no_match")):
                assert sharded["metrics"][part][key] == pytest.approx(value, rel=TOL), (part, key)
    # the cost table's inputs: the same stages timed, memory measured, the device named
    assert sharded["timing"].keys() == one["timing"].keys() and sharded["peak_memory_mb"] > 0
    assert sharded["device"] == one["device"] == "cpu"
    assert set(sharded) == set(one)


def _close_files(a, b, name):
    x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
    assert x.keys() == y.keys(), name
    for k in x:
        torch.testing.assert_close(x[k].float(), y[k].float(), rtol=0, atol=TOL, msg=k)
    return x


@pytest.mark.slow
def test_full_finetune_under_fsdp_matches_one_process(tmp_path):
    base = _base(tmp_path / "data") + ["method=full"]
    sharded = _fsdp_torchrun(base + ["trainer.per_device_train_batch_size=4"], tmp_path / "fsdp")
    one = train(compose_cfg(base + ["trainer.per_device_train_batch_size=8"], tmp_path / "one"))
    _same_record(sharded, one)
    # accelerate's FSDP path ran (DDP writes no pytorch_model_fsdp.bin), and model/ holds the
    # gathered full weights: every tensor at its full shape, equal to one process's
    assert os.path.exists(tmp_path / "fsdp" / "train" / "checkpoint-3" / "pytorch_model_fsdp.bin")
    weights = _close_files(tmp_path / "fsdp" / "model", tmp_path / "one" / "model", "model.safetensors")
    assert sum(v.numel() for v in weights.values()) == one["params"]["total"]


@pytest.mark.slow
def test_pilora_stage2_under_fsdp_matches_one_process_and_resumes(tmp_path):
    """Stage 1 in one process (FSDP cannot score sharded gradients); its importance.pt drives an
    FSDP stage 2, which matches the one-process stage 2; then an FSDP job killed after its first
    checkpoint (simulated: later checkpoints and outputs removed) resumes to the same adapter."""
    base = _base(tmp_path / "data") + ["method=pilora", "method.stage1.max_steps=3", "method.importance_interval=1"]
    base += [
        "trainer.save_strategy=steps",
        "trainer.save_steps=2",
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=2",
    ]
    one = train(compose_cfg(base + ["trainer.per_device_train_batch_size=8"], tmp_path / "one"))
    stage2 = base + [
        "trainer.per_device_train_batch_size=4",
        f"method.importance_from={tmp_path / 'one' / 'importance.pt'}",
    ]
    out = tmp_path / "fsdp"
    sharded = _fsdp_torchrun(stage2, out)
    _same_record(sharded, one)
    assert os.path.exists(out / "stage2" / "checkpoint-2" / "pytorch_model_fsdp.bin")
    for folder, files in (("adapter", ["adapter_model.safetensors"]), ("adapter_pilora", ["pilora_model.safetensors"])):
        for name in files:
            _close_files(out / folder, tmp_path / "one" / folder, name)
    first = {k: v.clone() for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()}
    # resume: keep checkpoint-2 only, as if the job had died after saving it
    shutil.rmtree(out / "stage2" / "checkpoint-3")
    for name in ("results.json", "adapter", "adapter_pilora"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = _fsdp_torchrun(stage2, out)
    assert "resuming from" in (out / "run.log").read_text() and "checkpoint-2" in (out / "run.log").read_text()
    assert resumed["steps"] == 3
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=TOL, msg=k)


@pytest.mark.slow
def test_pissa_under_fsdp_saves_the_converted_adapter(tmp_path):
    """PiSSA moves part of W0 into its adapter: the adapter saved from the gathered FSDP copy is the
    conversion against the initial adapter (rank 2r, loadable onto the pretrained model), equal to
    one process's, not the raw rank-r adapter that would reload onto W0 wrong."""
    base = _base(tmp_path / "data") + ["method=pissa", "method.r=4", "method.alpha=8"]
    sharded = _fsdp_torchrun(base + ["trainer.per_device_train_batch_size=4"], tmp_path / "fsdp")
    one = train(compose_cfg(base + ["trainer.per_device_train_batch_size=8"], tmp_path / "one"))
    _same_record(sharded, one)
    weights = _close_files(tmp_path / "fsdp" / "adapter", tmp_path / "one" / "adapter", "adapter_model.safetensors")
    r = one["config"]["method"]["r"]
    assert {v.shape[0] for k, v in weights.items() if ".lora_A." in k} == {2 * r}  # converted: rank 2r
    for folder in ("fsdp", "one"):
        saved = json.load(open(tmp_path / folder / "adapter" / "adapter_config.json"))
        assert saved["r"] == 2 * r


@pytest.mark.slow
def test_fsdp_on_cpu_ranks_is_refused_not_run_as_ddp(tmp_path):
    """Plain run.py on 2 CPU ranks with trainer.fsdp: accelerate prepares DDP (MULTI_CPU) instead,
    which would train unsharded without a word (a single unlaunched process is refused by
    transformers itself: "Using fsdp only works in distributed training")."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "run.py"]
    cmd += [*_base(tmp_path / "data"), "method=full", *FSDP, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "trainer.fsdp is set, but accelerate prepared this job as 'MULTI_CPU', not FSDP" in proc.stderr
    assert not os.path.exists(out / "results.json") and not list(out.glob("train/checkpoint-*"))  # nothing trained


@pytest.mark.parametrize(
    "method, message",
    [
        ("lora_dash", r"LoRA-Dash.*Run LoRA-Dash with DDP: drop trainer.fsdp"),
        ("lora_matched", r"stage 1 needs full \(unsharded\) LoRA gradients"),
    ],
)
def test_methods_that_cannot_shard_are_refused(tmp_path, method, message):
    cfg = compose_cfg(_base(tmp_path / "data") + [f"method={method}", *FSDP], tmp_path / "o")
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_fsdp_wrap_class_is_checked_for_adapter_methods_too(tmp_path):
    """A PiLoRA stage 2 (or LoRA) job is checked like full fine-tuning: a wrap class the model lacks."""
    bad = ["+trainer.fsdp=true", "+trainer.fsdp_config={version: 2, transformer_layer_cls_to_wrap: [LlamaBlock]}"]
    cfg = compose_cfg(_base(tmp_path / "data") + ["method=lora", *bad], tmp_path / "o")
    with pytest.raises(ValueError, match=r"\['LlamaBlock'\].*does not contain.*LlamaDecoderLayer"):
        train(cfg)


def test_cpu_ram_efficient_loading_is_refused_for_a_model_with_buffers():
    """accelerate's FSDP2 cpu_ram_efficient_loading broadcasts every state-dict entry as a sharded
    parameter, so PiLoRA's state dict (compact B blocks, partition masks) stops it with AttributeError
    ('Tensor' object has no attribute 'device_mesh'; seen on 2 gloo ranks): a PiLoRA job is refused
    before the Trainer is built, naming the fix, and a full fine-tune (parameters only) is not."""
    import types

    from conftest import tiny_llama_and_tokenizer

    from pilora import MethodConfig, prepare_model
    from pilora.methods.full import check_full_finetune_fsdp

    config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "cpu_ram_efficient_loading": True}
    args = types.SimpleNamespace(fsdp="full_shard", fsdp_config=config)
    model, _ = tiny_llama_and_tokenizer()
    check_full_finetune_fsdp(args, model)  # nothing but parameters
    targets = ["q_proj", "v_proj"]
    masks = {
        n: torch.arange(m.out_features) % 2 == 0 for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets
    }
    pilora = prepare_model(model, MethodConfig(name="pilora", r=2, target_modules=targets), masks=masks)
    with pytest.raises(
        ValueError, match=r"cpu_ram_efficient_loading=true loads a state dict of parameters only.*lora_B.*=false"
    ):
        check_full_finetune_fsdp(args, pilora)
    check_full_finetune_fsdp(
        types.SimpleNamespace(fsdp="full_shard", fsdp_config={**config, "cpu_ram_efficient_loading": False}), pilora
    )


def test_fsdp_units_and_memory_estimate_from_exact_counts():
    from conftest import tiny_llama_and_tokenizer

    model, _ = tiny_llama_and_tokenizer()
    c = model.config
    h, f, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = h // c.num_attention_heads * c.num_key_value_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    root = v * h * (1 if c.tie_word_embeddings else 2) + h  # embeddings (+ lm_head) and the final norm
    assert fsdp_units(model, ("LlamaDecoderLayer",)) == [layer] * layers + [root]
    total = sum(p.numel() for p in model.parameters())
    assert layers * layer + root == total
    m = fsdp_memory_per_gpu(total, total, [layer] * layers + [root], gpus=2)
    assert m["sharded"] == 16 * total // 2 and m["gathered"] == 2 * (root + 2 * layer)
    assert m["total"] == m["sharded"] + m["gathered"]
    # LLaMA2-7B on 8 GPUs: the figures conf/trainer/fsdp.yaml quotes
    with torch.device("meta"):
        units = fsdp_units(SETTINGS["LLaMA2-7B"][0](), ("LlamaDecoderLayer",))
    assert units == [202_383_360] * 32 + [262_148_096]
    assert sum(units) == meta_count("LLaMA2-7B", "full").total == 6_738_415_616
    est = fsdp_estimate("LLaMA2-7B", 8)
    assert est["sharded"] == 16 * 6_738_415_616 // 8 and est["gathered"] == 2 * (262_148_096 + 2 * 202_383_360)
    text = open(os.path.join(ROOT, "conf", "trainer", "fsdp.yaml")).read()
    assert f"{est['sharded'] / 2**30:.2f} GiB" in text and f"{est['total'] / 2**30:.2f} GiB" in text
    assert f"{est['gathered'] / 2**30:.2f} GiB" in text


def test_fsdp_trainer_config_composes_to_valid_training_arguments(tmp_path):
    from pilora.runner.train import _plain
    from pilora.runner.trainer_args import training_args
    from pilora.tasks import make_task

    cfg = _plain(compose_cfg(_base(tmp_path / "data") + ["trainer=fsdp", "method=full"], tmp_path / "o"))
    assert cfg["trainer"]["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    task = make_task(cfg["task"], cfg["model"], 0)
    args = training_args(cfg, task, str(tmp_path / "o"))
    assert args.fsdp and args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
