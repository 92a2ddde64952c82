"""Methods as plug-ins: the generic checks run over the registry, and a toy method registered here
(one registration, no other file) passes them and trains a short job through train()."""

import copy
import glob
import os

import pytest
import torch
from conftest import TinyMLP, train_steps
from helpers import CONF, FAST, compose_cfg, write_images
from omegaconf import OmegaConf

from pilora import count_parameters, prepare_model
from pilora.methods import INITS, METHODS, Method, MethodConfig, register_init, register_method, table_rows
from pilora.runner.train import train

X = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))


def check_method(name: str) -> None:
    """What every registered method must satisfy: output unchanged at init, training changes its
    weights, and every trainable tensor is counted as the method's parameters (no head here)."""
    torch.manual_seed(0)
    base = TinyMLP()
    model = prepare_model(
        copy.deepcopy(base), MethodConfig(name=name, r=2, alpha=4, dropout=0.0, target_modules=["up", "down"])
    )
    assert torch.allclose(model(X), base(X), atol=1e-5)
    c = count_parameters(model)
    assert c.adapter == c.trainable > 0, (
        f"{name}: {c.trainable - c.adapter} trainable parameters not counted (Method.adapter_keys)"
    )
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    train_steps(model, X, torch.zeros(8, dtype=torch.long), steps=2)
    assert any(not torch.equal(v, before[k]) for k, v in model.named_parameters() if v.requires_grad)


def check_tables(name: str) -> None:
    """Every row of the method is named in the analysis tables (which read the registry's rows)."""
    from analysis.table_model import method_name

    rows = dict(METHODS[name].rows)
    assert rows, f"{name} declares no rows (Method.rows)"
    assert {r: method_name(r) for r in rows} == rows, f"rows of {name} are not named in the analysis tables"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_method_passes_the_generic_checks(name):
    check_method(name)
    check_tables(name)


def test_every_method_file_names_a_declared_row():
    for path in glob.glob(os.path.join(CONF, "method", "*.yaml")):
        if os.path.basename(path).startswith("_"):
            continue
        m = compose_cfg([f"method={os.path.basename(path)[:-5]}"]).method
        assert (m.get("label") or m.name) in table_rows(), path


@pytest.fixture
def toy():
    """A LoRA variant whose init puts A on scaled orthonormal rows (B = 0 keeps the output)."""

    @register_init("toy_orth")
    def _orth(layer, adapter, cfg=None):
        torch.nn.init.orthogonal_(layer.lora_A[adapter].weight)

    register_method("toy", Method(init="toy_orth", rows=(("toy", "Toy LoRA"),)))
    yield "toy"
    METHODS.pop("toy"), INITS.pop("toy_orth")


def test_toy_method_passes_generic_checks_and_trains_a_job(toy, tmp_path, monkeypatch):
    import dataclasses

    import pilora.runner.train as runner

    seen = []  # the job's typed config before and after training: derived values go to a copy
    inner = runner._train

    def spy(cfg, method, ignored):
        before = dataclasses.asdict(method)
        try:
            return inner(cfg, method, ignored)
        finally:
            seen.append((before, dataclasses.asdict(method)))

    monkeypatch.setattr(runner, "_train", spy)
    check_method(toy)
    check_tables(toy)  # registered after analysis was imported, named all the same
    cfg = OmegaConf.to_container(
        compose_cfg(
            FAST + write_images(str(tmp_path / "img")) + ["method=lora", "trainer.max_steps=2"], tmp_path / "o"
        ),
        resolve=True,
    )
    cfg["method"]["name"] = toy
    rec = train(cfg)
    assert rec["status"] == "complete" and rec["method"] == "toy" and rec["steps"] == 2
    assert {k: rec[k] for k in ("pilora", "budget_match", "lora_dash")} == dict.fromkeys(
        ("pilora", "budget_match", "lora_dash")
    )
    assert 0 < rec["params"]["adapter"] < rec["params"]["trainable"]  # the task's head trains in full too
    ((before, after),) = seen
    assert after == before and before["modules_to_save"] is None  # the head was added to a copy
    assert os.path.isfile(tmp_path / "o" / "adapter" / "adapter_config.json")


def test_a_method_whose_tensors_are_not_declared_fails_instead_of_counting_zero(toy):
    @register_init("toy_extra")
    def _extra(layer, adapter, cfg=None):
        layer.toy_gate = torch.nn.Parameter(torch.zeros(1))  # a trained tensor no adapter key names

    register_method("toy_extra", Method(init="toy_extra", rows=(("toy_extra", "x"),)))
    try:
        with pytest.raises(AssertionError, match="not counted"):
            check_method("toy_extra")
    finally:
        METHODS.pop("toy_extra"), INITS.pop("toy_extra")
