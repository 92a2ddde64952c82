"""The README's Python example runs exactly as written; the demo's code path learns."""

import os
import re

import pytest
from helpers import compose_cfg

from pilora.runner.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    import torch
    from peft import PeftModel

    from pilora import load_adapter

    model, x = namespace["model"], namespace["x"]
    model.eval()
    # the saved, exported and merged adapters all reproduce the trained model
    out = model(x)
    assert torch.allclose(namespace["merged"](x), out, atol=1e-5)
    reloaded = load_adapter(namespace["make_model"](), "my_pilora")
    assert torch.allclose(reloaded(x), out, atol=1e-5)
    stock = PeftModel.from_pretrained(namespace["make_model"](), "my_lora")
    assert torch.allclose(stock(x), out, atol=1e-5)


@pytest.mark.slow
def test_demo_code_path_learns_at_reduced_size(tmp_path):
    """experiment=demo, shrunk: both methods beat the 50 % majority baseline."""
    small = [
        "task.dataset.builder_args.n_train=400",
        "task.dataset.builder_args.n_validation=100",
        "task.dataset.builder_args.n_test=100",
        "trainer.num_train_epochs=2",
        "trainer.logging_steps=5",
    ]
    accs = {}
    for method in ("lora", "pilora"):
        cfg = compose_cfg(
            ["experiment=demo", f"method={method}", *small, "trainer.disable_tqdm=true"], tmp_path / method
        )
        rec = train(cfg)
        accs[method] = rec["metrics"]["test"]["test_accuracy"]
        assert rec["model"] == "minilm-l6" and rec["task"] == "reviews"
    # 100 balanced test examples: 0.6 is 2 standard errors above the 50 % majority baseline
    assert accs["lora"] > 0.6 and accs["pilora"] > 0.6, accs
    from pilora.runner.summary import format_table, summary_rows

    table = format_table(summary_rows(str(tmp_path)))
    assert "lora" in table and "pilora" in table and f"{accs['lora']:.4f}" in table
