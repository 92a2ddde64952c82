"""Same seed, same machine (CPU): bit-identical statistics, masks, adapter weights and metrics.
(What varies on GPUs is in README "Determinism".)"""

import os

import pytest
import torch
from helpers import FAST, compose_cfg, write_images
from safetensors.torch import load_file

from pilora import ImportanceStats
from pilora.runner.train import train


def _scores(rec):
    """Every loss / accuracy the record holds (timings and throughputs excluded)."""
    keep = lambda d: {k: v for k, v in (d or {}).items() if k.endswith(("loss", "accuracy"))}  # noqa: E731
    return {
        "train_loss": rec["train_loss"],
        "epochs": [keep(e) for e in rec["epochs"]],
        **{part: keep(rec["metrics"][part]) for part in ("final", "best", "test")},
    }


@pytest.mark.slow
def test_same_seed_same_result(tmp_path):
    overrides = (
        FAST
        + write_images(str(tmp_path / "img"))
        + ["method=pilora", "method.stage1.max_steps=3", "method.importance_interval=1", "trainer.num_train_epochs=2"]
    )
    runs = [train(compose_cfg(overrides, tmp_path / name)) for name in ("a", "b")]
    other = train(compose_cfg(overrides + ["seed=1"], tmp_path / "seed1"))

    assert _scores(runs[0]) == _scores(runs[1])  # exact equality, not approx
    assert runs[0]["pilora"]["dominant_fraction_per_module"] == runs[1]["pilora"]["dominant_fraction_per_module"]
    a, b = (ImportanceStats.load(tmp_path / n / "importance.pt") for n in ("a", "b"))
    for name in a.modules:
        assert torch.equal(a.modules[name].hits, b.modules[name].hits)
        assert torch.equal(a.modules[name].score_sum, b.modules[name].score_sum)
    wa, wb = (load_file(os.path.join(tmp_path, n, "adapter", "adapter_model.safetensors")) for n in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the seed matters (the check above is not vacuous)
    assert _scores(other)["train_loss"] != _scores(runs[0])["train_loss"]
