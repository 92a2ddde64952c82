"""``method.importance_from``: statistics from another job are checked against this run (model,
target modules, module set and shapes) and every error names the file and the module."""

import os

import pytest
import torch
from helpers import FAST, compose_cfg, write_images

from pilora.runner.train import train

BASE = FAST + ["method=pilora", "method.stage1.max_steps=2", "method.importance_interval=1", "trainer.max_steps=1"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    data = write_images(str(d / "img"))
    rec = train(compose_cfg(BASE + data, d / "run"))
    return data, rec["pilora"]["importance_file"], rec


def _variant(src, dst, edit):
    payload = torch.load(src, weights_only=True)
    payload = edit(payload)
    torch.save(payload, dst)
    return str(dst)


def _run_with(data, path, out, *extra):
    return train(compose_cfg(BASE + data + [f"method.importance_from={path}", *extra], out))


def test_matching_statistics_are_used(stage1, tmp_path):
    data, path, rec = stage1
    again = _run_with(data, path, tmp_path / "ok")
    assert again["pilora"]["dominant_fraction_per_module"] == rec["pilora"]["dominant_fraction_per_module"]


def _extra(p):
    name = next(iter(p["modules"]))
    p["modules"]["vision_model.extra.fc9"] = dict(p["modules"][name])
    return p


def _missing(p):
    p["modules"].pop(sorted(p["modules"])[0])
    return p


def _resized(p):
    name = sorted(p["modules"])[0]
    m = p["modules"][name]
    rows = m["shape"][0] + 16
    p["modules"][name] = {
        **m,
        "shape": [rows, m["shape"][1]],
        "hits": torch.zeros(rows, dtype=m["hits"].dtype),
        "score_sum": torch.zeros(rows, dtype=m["score_sum"].dtype),
    }
    return p


def _other_model(p):
    p["meta"]["model"] = "roberta-large"
    return p


def _other_targets(p):
    p["meta"]["target_modules"] = ["query", "value"]
    return p


def _hits_above_t(p):
    name = sorted(p["modules"])[0]
    p["modules"][name]["hits"] = p["modules"][name]["hits"] + p["modules"][name]["checks"] + 1
    return p


def _nan_scores(p):
    name = sorted(p["modules"])[1]
    p["modules"][name]["score_sum"] = p["modules"][name]["score_sum"].clone()
    p["modules"][name]["score_sum"][0] = float("nan")
    return p


@pytest.mark.parametrize(
    "edit, message",
    [
        # `method.importance_from=edited.pt` whose hit counts exceed T, or whose scores are NaN
        (_hits_above_t, r"cannot come from stage 1: clip\.\S+: hit counts \d+\.\.\d+ outside 0\.\.T = \d+"),
        (_nan_scores, r"cannot come from stage 1: clip\.\S+: 1 NaN/inf score sum.*or its stage 1 diverged"),
        (_extra, r"statistics for modules the model lacks: \['vision_model\.extra\.fc9'\]"),
        (_missing, r"modules without statistics: \['clip\.encoder\.layers\.0\."),
        (_resized, r"shape mismatches: clip\.encoder\.layers\.0\.\S+: stats \(\d+, \d+\) vs model"),
        (_other_model, r"made for model 'roberta-large', this run uses 'tiny-clip'"),
        (_other_targets, r"made for target modules \['query', 'value'\]"),
        (lambda p: [1, 2, 3], r"holds a list, not importance statistics"),
    ],
)
def test_mismatching_statistics_name_the_file_and_module(stage1, tmp_path, edit, message):
    data, path, _ = stage1
    bad = _variant(path, tmp_path / "bad.pt", edit)
    with pytest.raises(ValueError, match=rf"{bad}'?\S*.*{message}") as info:
        _run_with(data, bad, tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "results.json")
    assert "method.importance_from" in str(info.value) or "list" in str(info.value)
