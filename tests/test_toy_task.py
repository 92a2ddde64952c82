"""Adding a generation task (e.g. GSM8K) is one YAML: the generation family's schema fills every key
the YAML leaves out, ``task.answer_pattern`` says how an answer is read from a response, and the
record names its headline metric, which analysis reports without a branch of its own
(docs/adding-a-task.md)."""

import json
import os
import re

import pandas as pd
import pytest
from helpers import FAST, compose_cfg

from analysis.records import load_records
from analysis.scores import headline_column, score
from pilora.runner.train import train

TOY_YAML = """\
# a GSM8K-like toy: numeric answers, read by answer_pattern
name: toy_sums
family: generation
dataset:
  root: {root}
  train_file: ${{.root}}/train.json
eval_sets:
  sums: ${{task.dataset.root}}/sums.json
answer_pattern: 'answer is (-?[0-9]+)'
reference: a toy arithmetic task (tests/test_toy_task.py)
"""


def _write_task(tmp_path) -> str:
    """A config folder holding only ``task/toy/sums.yaml``, and the data files it names."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"instruction": f"What is {a} + {b}?", "input": "", "output": f"the answer is {a + b}", "answer": str(a + b)}
        for a in range(6)
        for b in range(4)
    ]
    (data / "train.json").write_text(json.dumps(rows))
    (data / "sums.json").write_text(json.dumps(rows[:4]))
    conf = tmp_path / "conf" / "task" / "toy"
    conf.mkdir(parents=True)
    (conf / "sums.yaml").write_text(TOY_YAML.format(root=data))
    return str(tmp_path / "conf")


def test_a_generation_task_from_one_yaml_trains_scores_and_reports_its_headline(tmp_path):
    searchpath = _write_task(tmp_path)
    over = FAST + [f"hydra.searchpath=[file://{searchpath}]", "task=toy/sums", "model=tiny-llama"]
    over += ["method=lora", "method.r=4", "trainer.max_steps=2", "trainer.save_strategy=no"]
    over += ["++trainer.eval_strategy=no", "++trainer.load_best_model_at_end=false", "++trainer.bf16=false"]
    over += [
        "++trainer.fp16=false",
        "++task.val_set_size=4",
        "++task.cutoff_len=32",
        "++task.generation.max_new_tokens=4",
    ]
    cfg = compose_cfg(over, tmp_path / "run")
    # the schema's defaults fill what the YAML leaves out
    assert cfg.task.family == "generation" and "val_split_seed" not in cfg.task
    rec = train(cfg)
    assert rec["status"] == "complete"
    assert rec["evaluation"]["headline"] == {"metric": "test_avg_accuracy", "split": "test", "from": "test"}
    assert rec["config"]["task"]["answer_pattern"] == "answer is (-?[0-9]+)"
    assert set(rec["metrics"]["test"]) == {
        "test_sums_accuracy",
        "test_sums_no_match",
        "test_sums_total",
        "test_avg_accuracy",
    }
    preds = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "predictions", "sums.jsonl"))]
    assert len(preds) == 4
    for p in preds:  # the extracted answer is the pattern's group in the response, or None
        found = re.search(r"answer is (-?[0-9]+)", p["response"].split("### Response:")[-1])
        assert p["extracted"] == (found.group(1) if found else None)
        assert p["correct"] == (p["extracted"] == p["answer"])
    df = load_records(str(tmp_path / "run"))
    assert len(df) == 1 and df.loc[0, "headline_metric"] == "test_avg_accuracy"
    assert headline_column(df.loc[0]) == "test_avg_accuracy"
    assert score(df).iloc[0] == rec["metrics"]["test"]["test_avg_accuracy"]


def test_the_headline_a_record_names_is_what_analysis_scores():
    rows = pd.DataFrame(
        [
            # GLUE with the dev set scored once: the task names test_<metric>, not the holdout's epochs
            {"family": "classification", "metric": "accuracy", "headline_metric": "test_accuracy",
             "headline_from": "test", "test_accuracy": 0.7, "best_eval_accuracy": 0.9},
            {"family": "classification", "metric": "accuracy", "headline_metric": "eval_accuracy",
             "headline_from": "epoch", "best_eval_accuracy": 0.8, "final_eval_accuracy": 0.6},
            # a record from before evaluation.headline: its family's rule
            {"family": "vision", "metric": "accuracy", "test_accuracy": 0.5},
        ]
    )  # fmt: skip
    assert score(rows).tolist() == [0.7, 0.8, 0.5]
    assert score(rows, "final").tolist() == [0.7, 0.6, 0.5]
    unknown = pd.DataFrame([{"family": "speech", "metric": "wer", "test_wer": 0.1, "path": "r/results.json"}])
    with pytest.raises(ValueError, match=r"r/results.json.*'speech'.*names no headline"):
        score(unknown)
