"""W&B as a source of truth, on REAL offline run files.

A tiny sweep (tiny CLIP on generated images: LoRA and PiLoRA x 2 seeds, a budget-matched LoRA x 2
seeds) is logged with ``logger=wandb`` offline. The tests read the run files W&B wrote
(``run-<id>.wandb``) and check the runs' names, config, step axes, summary and artifacts, then
build the analysis input from those files and compare the tables byte for byte with the tables
from the local ``results.json`` records.
"""

import glob
import hashlib
import json
import os

import pytest
from helpers import FAST, compose_cfg, vision_overrides

QUICK = FAST + ["logger=wandb", "logger.mode=offline", "trainer.save_strategy=no", "sweep_name=tiny"]
PILORA = ["method.stage1.max_steps=3", "method.importance_interval=1"]


def _vision(d):
    return vision_overrides(d) + ["trainer.max_steps=3"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import torch
    from helpers import write_images

    from pilora.runner.train import train

    base = tmp_path_factory.mktemp("wandb_sweep")
    img = str(base / "img")
    write_images(img)
    root = base / "multirun" / "tiny"
    old = {k: os.environ.get(k) for k in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    for k in old:  # W&B stages artifact files here; keep them inside the test's folder
        os.environ[k] = str(base / k.lower())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, extra in (
            ("lora", ["method=lora"]),
            ("pilora", ["method=pilora", *PILORA]),
            ("lora_matched", ["method=lora_matched", *PILORA]),
        ):
            for seed in (0, 1):
                train(
                    compose_cfg(QUICK + _vision(img) + extra + [f"seed={seed}"], root / f"method={method},seed={seed}")
                )
    finally:
        torch.set_num_threads(threads)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return base


def _records(root):
    out = {}
    for path in glob.glob(os.path.join(root, "**", "results.json"), recursive=True):
        if f"{os.sep}wandb{os.sep}" not in path:
            out[path] = json.load(open(path))
    return out


def _runs(root):
    from analysis.wandb_runs import find_offline_runs, read_run

    return {r["name"]: r for r in map(read_run, find_offline_runs(str(root)))}


def test_each_job_is_one_named_grouped_tagged_run_with_the_hydra_config_only(sweep):
    runs = _runs(sweep)
    assert sorted(runs) == sorted(
        f"{m}-eurosat-tiny-clip-s{s}" for m in ("lora", "pilora", "lora_matched") for s in (0, 1)
    )
    recs = {(r["method"], r["seed"]): r for r in _records(sweep).values()}
    for name, run in runs.items():
        rec = recs[(name.split("-")[0], int(name[-1]))]
        assert run["group"] == "tiny" and run["state"] == "finished"
        assert f"method:{rec['method']}" in run["tags"] and "task:eurosat" in run["tags"]
        assert run["job_type"] == ("single_stage" if rec["method"] == "lora" else "two_stage")
        # the config is the resolved Hydra config, nothing from Trainer or PEFT beside it
        assert run["config"] == json.loads(json.dumps(rec["config"]))
        assert "learning_rate" not in run["config"] and "peft_config" not in run["config"]


def test_stages_log_under_their_own_prefix_and_step_axis(sweep):
    from analysis.wandb_runs import read_records

    run = _runs(sweep)["pilora-eurosat-tiny-clip-s0"]
    path = glob.glob(os.path.join(run["path"], "run-*.wandb"))[0]
    steps = {"stage1": [], "stage2": []}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
        stages = {k.split("/")[0] for k in row if not k.startswith("_")}
        assert len(stages) == 1 and stages <= {"stage1", "stage2"}, row  # one stage per row, nothing unprefixed
        stage = stages.pop()
        steps[stage].append(row[f"{stage}/step"])
    assert steps["stage1"] == sorted(steps["stage1"]) and max(steps["stage1"]) == 3  # stage 1: 3 steps
    assert steps["stage2"] == sorted(steps["stage2"]) and min(steps["stage2"]) == 1  # its own axis, from 1


def test_summary_holds_the_record_and_artifacts_hold_its_files(sweep):
    runs = _runs(sweep)
    recs = {(r["method"], r["seed"]): r for r in _records(sweep).values()}
    for name, run in runs.items():
        rec, summ = recs[(name.split("-")[0], int(name[-1]))], run["summary"]
        for key in ("timing", "peak_memory_mb", "device", "params", "metrics", "steps", "pilora", "budget_match"):
            assert summ[key] == json.loads(json.dumps(rec[key])), key
        assert summ["label"] == rec["method"]
        assert set(run["artifact_types"]) == {"results", "adapter"}
        assert json.load(open(run["artifact_files"]["results.json"])) == json.loads(json.dumps(rec))
        if rec["method"] != "lora":
            assert summ["T"] == 3 if rec["method"] == "pilora" else True
            stats = open(run["artifact_files"]["importance.pt"], "rb").read()
            own = (rec["pilora"] or rec["budget_match"])["importance_file"]
            assert hashlib.sha1(stats).digest() == hashlib.sha1(open(own, "rb").read()).digest()
        if rec["method"] == "lora_matched":
            assert summ["budget_match"]["residual"] == rec["budget_match"]["residual"]


@pytest.mark.parametrize("via", ["artifacts", "summary"])
def test_tables_from_offline_run_files_are_byte_identical_to_local_records(sweep, via, monkeypatch):
    from analysis import records, tables

    before = {p: open(p, "rb").read() for p in _records(sweep)}
    local = records.load_records(str(sweep))
    if via == "summary":  # a run whose record file is not available: the summary alone must do
        real = records.wandb_record
        monkeypatch.setattr(records, "wandb_record", lambda item: real({**item, "record": None, "artifact_files": {}}))
    remote = records.load_wandb_dir(str(sweep))
    assert len(local) == len(remote) == 6
    ours = tables.render(local, ["3"], "best", False, "adapter_share", False, cost=True)
    theirs = tables.render(remote, ["3"], "best", False, "adapter_share", False, cost=True)
    assert theirs.encode() == ours.encode()
    assert "LoRA (budget-matched)" in ours and "(n=2)" in ours  # the label, and its two seeds averaged
    cost = ours[ours.index("Cost") :] if "Cost" in ours else ours
    assert "CPU-h" in cost  # the cost table has rows
    assert before == {p: open(p, "rb").read() for p in _records(sweep)}  # no local record touched


def test_tables_cli_reads_wandb_dir_and_figures_come_from_the_artifacts(sweep, tmp_path, capsys):
    from analysis import figures, records, tables

    assert tables.main(["--root", str(sweep), "--table", "3", "--out", str(tmp_path / "local.md")]) == 0
    assert tables.main(["--wandb-dir", str(sweep), "--table", "3", "--out", str(tmp_path / "wandb.md")]) == 0
    assert (tmp_path / "local.md").read_bytes() == (tmp_path / "wandb.md").read_bytes()

    df = records.load_wandb_dir(str(sweep))
    stats = set(df[df.method == "pilora"]["importance_file"])
    assert all(str(sweep / "wandb_data_dir") in p for p in stats)  # W&B's copies, not the jobs' files
    written, _ = figures.make_all(df, str(tmp_path / "fig"), only=["2"])
    assert any(p.endswith(".png") for p in written)

    # --shared-scale: every panel of Fig. 2/7 on one colour scale (own scales otherwise)
    def clims(shared):
        fig = figures.gradient_heatmaps(sorted(stats)[0], "all", shared_scale=shared)
        return {im.get_clim() for ax in fig.axes for im in ax.images}

    assert len(clims(True)) == 1 and len(clims(False)) > 1


def test_bad_wandb_sources_get_a_clear_error(sweep, tmp_path, capsys, monkeypatch):
    import shutil

    import wandb

    from analysis import records, tables

    (tmp_path / "empty").mkdir()
    assert tables.main(["--wandb-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no offline W&B runs" in err and "logger=wandb" in err and "Traceback" not in err

    class Api:
        def __init__(self, *a, **k):
            pass

        def runs(self, path, filters=None):
            raise wandb.errors.CommError(f"Could not find project {path}")

    monkeypatch.setattr(wandb, "Api", Api)
    assert tables.main(["--wandb", "me/nope", "--wandb-cache", str(tmp_path / "cache")]) == 2
    assert "W&B project 'me/nope' not found" in capsys.readouterr().err
    assert tables.main(["--wandb", "a/b/c"]) == 2 and "ENTITY/PROJECT" in capsys.readouterr().err

    # a run whose artifact files and record copy are gone is skipped, by name, and the rest are read
    copy = tmp_path / "copy"
    shutil.copytree(sweep / "multirun", copy)
    run = next(r for r in _runs(copy).values() if r["name"] == "lora-eurosat-tiny-clip-s0")
    os.remove(os.path.join(run["path"], "files", "results.json"))
    staged = run["artifact_files"]["results.json"]
    os.rename(staged, staged + ".gone")
    try:
        df = records.load_wandb_dir(str(copy))
    finally:
        os.rename(staged + ".gone", staged)
    err = capsys.readouterr().err
    assert len(df) == 5 and "artifact files are gone" in err and run["path"] in err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["probe", "init"])
def test_online_without_network_falls_back_to_offline(tmp_path, monkeypatch, caplog, where):
    """``logger.mode=online`` and a W&B server that cannot be reached: the job neither blocks for
    minutes nor dies; it logs offline (the run files are all there) and says so, in the log and the record."""
    import time

    from helpers import write_images

    from pilora.runner import wandb as logging_wandb
    from pilora.runner.train import train

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    if where == "init":  # the probe passes (e.g. behind a proxy): wandb.init itself times out
        monkeypatch.setattr(logging_wandb, "unreachable", lambda timeout: None)
    out = tmp_path / "run"
    cfg = compose_cfg(
        QUICK + _vision(str(tmp_path / "img")) + ["method=lora", "logger.mode=online", "logger.init_timeout_s=5"], out
    )
    write_images(str(tmp_path / "img"))
    t0 = time.time()
    with caplog.at_level("WARNING", logger="pilora"):
        rec = train(cfg)
    assert time.time() - t0 < 60
    assert rec["status"] == "complete" and rec["steps"] == 3
    assert "logger.mode=online but" in caplog.text and "logging this run offline instead" in caplog.text
    reason = "cannot be reached" if where == "probe" else "wandb.init failed"
    assert rec["wandb"]["mode"] == "offline" and reason in rec["wandb"]["offline_fallback"]
    runs = _runs(out)
    assert len(runs) == 1
    (run,) = runs.values()
    assert run["summary"]["status"] == "complete" and run["config"]["logger"]["mode"] == "online"
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "results.json"))
