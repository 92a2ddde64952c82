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
    """PiLoRA logs ``stage1/`` and ``stage2/``; a single-stage method's one training is ``train/``
    (the budget-matched LoRA: ``stage1/`` then ``train/``), each on its own step axis."""
    from analysis.wandb_runs import read_records

    runs = _runs(sweep)
    expected = {"pilora": ("stage1", "stage2"), "lora": ("train",), "lora_matched": ("stage1", "train")}
    for method, stages_of_method in expected.items():
        run = runs[f"{method}-eurosat-tiny-clip-s0"]
        path = glob.glob(os.path.join(run["path"], "run-*.wandb"))[0]
        steps = {}
        for rec in read_records(path):
            if rec["type"] != "history":
                continue
            row = rec["history"]["item"]
            stages = {k.split("/")[0] for k in row if not k.startswith("_")}
            assert len(stages) == 1, row  # one stage per row, nothing unprefixed
            stage = stages.pop()
            steps.setdefault(stage, []).append(row[f"{stage}/step"])
        assert tuple(sorted(steps)) == stages_of_method, (method, sorted(steps))
        for stage, seen in steps.items():
            assert seen == sorted(seen) and min(seen) == 1 and max(seen) == 3, (method, stage, seen)  # 3 steps each


def test_summary_holds_the_record_and_artifacts_hold_its_files(sweep):
    runs = _runs(sweep)
    recs = {(r["method"], r["seed"]): r for r in _records(sweep).values()}
    for name, run in runs.items():
        rec, summ = recs[(name.split("-")[0], int(name[-1]))], run["summary"]
        for key in ("timing", "peak_memory_mb", "device", "params", "metrics", "steps", "pilora", "budget_match"):
            assert summ[key] == json.loads(json.dumps(rec[key])), key
        assert summ["label"] == rec["method"]
        assert set(run["artifact_types"]) == {"results", "model"}
        assert json.load(open(run["artifact_files"]["results.json"])) == json.loads(json.dumps(rec))
        # the adapter: a model artifact that names its base model, method, ranks and targets
        model = run["artifacts"]["model"]
        adapter = os.path.join(rec["config"]["output_dir"], "adapter")
        saved = json.load(open(os.path.join(adapter, "adapter_config.json")))
        meta = model["metadata"]
        assert model["name"] == f"{name}-adapter" and meta["base_model"] == "tiny-clip"
        assert meta["method"] == rec["method"] and meta["r"] == rec["config"]["method"]["r"] == 8
        assert meta["supplementary_r"] == (
            None if rec["method"] == "lora" else rec["config"]["method"]["supplementary_r"]
        )
        assert meta["target_modules"] == sorted(saved["target_modules"]) and len(meta["target_modules"]) == 6
        files = set(model["files"])
        assert "adapter/adapter_model.safetensors" in files
        assert ("adapter_pilora/pilora_config.json" in files) == (rec["method"] == "pilora")
        # the run folder holds what the analysis reads, and the packages it ran with
        kept = set(os.listdir(os.path.join(run["path"], "files")))
        assert {"results.json", "requirements.txt"} <= kept
        assert ("importance.pt" in kept) == (rec["method"] != "lora")
        if rec["method"] != "lora":
            assert summ["T"] == 3 if rec["method"] == "pilora" else True
            stats = open(run["artifact_files"]["importance.pt"], "rb").read()
            own = (rec["pilora"] or rec["budget_match"])["importance_file"]
            assert hashlib.sha1(stats).digest() == hashlib.sha1(open(own, "rb").read()).digest()
        if rec["method"] == "lora_matched":
            assert summ["budget_match"]["residual"] == rec["budget_match"]["residual"]


@pytest.mark.parametrize("via", ["artifacts", "summary"])
def test_tables_from_offline_run_files_are_byte_identical_to_local_records(sweep, via, monkeypatch):
    from analysis import records, tables, wandb_source

    before = {p: open(p, "rb").read() for p in _records(sweep)}
    local = records.load_records(str(sweep))
    if via == "summary":  # a run whose record file is not available: the summary alone must do
        real = wandb_source.wandb_record
        monkeypatch.setattr(
            wandb_source, "wandb_record", lambda item: real({**item, "record": None, "artifact_files": {}})
        )
    remote = wandb_source.load_wandb_dir(str(sweep))
    assert len(local) == len(remote) == 6
    ours = tables.render(local, ["3"], "best", False, "adapter_share", False, cost=True)
    theirs = tables.render(remote, ["3"], "best", False, "adapter_share", False, cost=True)
    assert theirs.encode() == ours.encode()
    assert "LoRA (budget-matched)" in ours and "(n=2)" in ours  # the label, and its two seeds averaged
    cost = ours[ours.index("Cost") :] if "Cost" in ours else ours
    assert "CPU-h" in cost  # the cost table has rows
    assert before == {p: open(p, "rb").read() for p in _records(sweep)}  # no local record touched


def test_tables_cli_reads_wandb_dir_and_figures_come_from_the_artifacts(sweep, tmp_path, capsys):
    from analysis import figures, tables, wandb_source

    assert tables.main(["--root", str(sweep), "--table", "3", "--out", str(tmp_path / "local.md")]) == 0
    assert tables.main(["--wandb-dir", str(sweep), "--table", "3", "--out", str(tmp_path / "wandb.md")]) == 0
    assert (tmp_path / "local.md").read_bytes() == (tmp_path / "wandb.md").read_bytes()

    df = wandb_source.load_wandb_dir(str(sweep))
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

    from analysis import tables, wandb_source

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

    # a run whose artifact files are neither staged nor in its files/ is an error naming that run
    copy = tmp_path / "copy"
    shutil.copytree(sweep / "multirun", copy)
    run = next(r for r in _runs(copy).values() if r["name"] == "pilora-eurosat-tiny-clip-s0")
    os.remove(os.path.join(run["path"], "files", "importance.pt"))
    staged = run["artifact_files"]["importance.pt"]
    os.rename(staged, staged + ".gone")
    try:
        with pytest.raises(wandb_source.WandbSourceError, match="run pilora-eurosat-tiny-clip-s0 .* importance.pt"):
            wandb_source.load_wandb_dir(str(copy))
        assert tables.main(["--wandb-dir", str(copy)]) == 2
        err = capsys.readouterr().err
        assert "pilora-eurosat-tiny-clip-s0" in err and run["path"] in err and "Traceback" not in err
    finally:
        os.rename(staged + ".gone", staged)


def test_a_copied_wandb_folder_is_enough_for_tables_and_figures(sweep, tmp_path):
    """Only the jobs' ``wandb/`` folders, copied elsewhere, and W&B's staging folder gone: the
    tables equal the local ones and the heat maps come from the runs' own ``files/`` copies."""
    import shutil

    from analysis import figures, records, tables, wandb_source

    copy = tmp_path / "copied"
    for folder in glob.glob(str(sweep / "multirun" / "tiny" / "*" / "wandb")):
        shutil.copytree(folder, copy / os.path.basename(os.path.dirname(folder)) / "wandb", symlinks=False)
    staging = sweep / "wandb_data_dir"
    staging.rename(tmp_path / "staging_gone")
    try:
        df = wandb_source.load_wandb_dir(str(copy))
        assert len(df) == 6
        stats = set(df[df.method == "pilora"]["importance_file"])
        assert len(stats) == 2 and all(p.startswith(str(copy)) and os.path.isfile(p) for p in stats)
        local = records.load_records(str(sweep / "multirun"))
        ours = tables.render(local, ["3"], "best", False, "adapter_share", False, cost=True)
        assert tables.render(df, ["3"], "best", False, "adapter_share", False, cost=True) == ours
        written, skipped = figures.make_all(df, str(tmp_path / "fig"), only=["2"])
        assert [os.path.basename(p) for p in written if p.endswith(".png")] == ["fig2_gradients_tiny-clip_eurosat.png"]
        assert not skipped
    finally:
        (tmp_path / "staging_gone").rename(staging)


def test_run_names_groups_and_tags_follow_the_sweep_point(monkeypatch):
    """Pure functions of the config: a lone job's group is its name without the seed; a job
    started from Python in a folder named by other overrides gets a hash of that folder name."""
    from hydra.core.hydra_config import HydraConfig

    from pilora.runner import wandb as w

    # started from Python: no Hydra config, whatever an earlier test in this process left set
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)

    cfg = {
        "method": {"name": "pilora", "label": None, "r": 8, "supplementary_r": 2},
        "task": {"name": "sst2"},
        "model": {"name": "tiny-roberta"},
        "seed": 1,
        "sweep_name": "default",
        "logger": {},
    }
    assert w.sweep_point(cfg, "/x/method=pilora,seed=1") == {}
    p1, p2 = (w.sweep_point(cfg, f"/x/method.supplementary_r={r},method=pilora") for r in (1, 2))
    assert p1 != p2 and set(p1) == {"job"} and len(p1["job"]) == 6
    assert w.run_name(cfg, p1) == f"pilora-sst2-tiny-roberta-s1-{p1['job']}"
    assert w.run_name(cfg, {"method.supplementary_r": "2"}) == "pilora-sst2-tiny-roberta-s1-supplementary_r=2"
    assert w.run_group(cfg, {}) == "pilora-sst2-tiny-roberta"  # no sweep: the seeds of one setting
    assert w.run_group({**cfg, "sweep_name": "fig4_rprime"}, {}) == "fig4_rprime"
    assert w.run_group({**cfg, "logger": {"group": "mine"}}, {}) == "mine"
    long = {f"method.key_{i}": "x" * 10 for i in range(4)}
    assert len(w.run_name(cfg, long)) == len("pilora-sst2-tiny-roberta-s1-") + 6
    assert (
        w.artifact_name(w.run_name(cfg, {"method.supplementary_r": "2"}))
        == "pilora-sst2-tiny-roberta-s1-supplementary_r_2"
    )


@pytest.mark.slow
def test_each_point_of_a_run_py_sweep_is_a_run_and_artifact_of_its_own(tmp_path):
    """``run.py -m method.supplementary_r=1,2 seed=0,1``: four runs with four names, tagged with
    their r', whose adapters are four artifacts; the closing table tells the rows apart."""
    import subprocess
    import sys

    from helpers import write_images

    overrides = write_images(str(tmp_path / "img")) + [
        "trainer.logging_steps=1",
        "trainer.warmup_steps=0",
        "trainer.save_strategy=no",
        "trainer.disable_tqdm=true",
        "trainer.max_steps=2",
        "method=pilora",
        "method.stage1.max_steps=2",
        "method.importance_interval=1",
        "logger=wandb",
        "sweep_name=rsweep",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "method.supplementary_r=1,2",
        "seed=0,1",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        env[k] = str(tmp_path / k.lower())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *overrides], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path / "sweep")
    names = {f"pilora-eurosat-tiny-clip-s{s}-supplementary_r={r}" for s in (0, 1) for r in (1, 2)}
    assert set(runs) == names
    adapters = set()
    for name, run in runs.items():
        r = name[-1]
        assert run["group"] == "rsweep" and f"method.supplementary_r={r}" in run["tags"]
        assert run["artifacts"]["model"]["metadata"]["supplementary_r"] == int(r)
        adapters.add(run["artifacts"]["model"]["name"])
    assert len(adapters) == 4
    # the multirun's closing table: r' and the folder on every row
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("pilora ")]
    assert len(lines) == 4 and len(set(lines)) == 4
    assert sorted(ln.split()[3] for ln in lines) == ["supplementary_r=1"] * 2 + ["supplementary_r=2"] * 2
    assert all(ln.split()[-1] in os.listdir(tmp_path / "sweep") for ln in lines)
    # PEFT's FutureWarning about the partition masks: once per process at most
    assert (proc.stdout + proc.stderr).count("FutureWarning") <= 1


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


def test_notebooks_read_offline_wandb_runs_and_share_the_colour_scale(sweep, monkeypatch):
    """``PILORA_WANDB_DIR``: the tables notebook shows the tables of the offline runs (the same
    Markdown as ``analysis.tables`` from those runs) and the heat-map notebook draws their
    ``importance.pt``; ``PILORA_SHARED_SCALE=1`` puts each figure's panels on one colour range."""
    import nbformat
    from nbclient import NotebookClient
    from test_analysis import REPO, _kernel_name

    from analysis import tables, wandb_source

    monkeypatch.setenv("PILORA_WANDB_DIR", str(sweep))
    monkeypatch.setenv("PILORA_RESULTS", str(sweep / "nothing_here"))  # the W&B source must win
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranges = {}
    for shared in ("1", "0"):
        monkeypatch.setenv("PILORA_SHARED_SCALE", shared)
        names = ("tables.ipynb", "gradient_heatmaps.ipynb") if shared == "1" else ("gradient_heatmaps.ipynb",)
        for name in names:
            nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
            NotebookClient(
                nb,
                timeout=180,
                kernel_name=_kernel_name(),
                resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
            ).execute()
            outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
            assert not [o for o in outputs if o.output_type == "error"], name
            if name == "tables.ipynb":
                shown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
                expected = tables.render(wandb_source.load_wandb_dir(str(sweep)), ["3"], which="best")
                assert expected in shown and "tiny-clip" in expected
            else:
                assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2  # Fig. 2 and Fig. 7
                text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
                ranges[shared] = [line[line.rindex("[(") :].count("(") for line in text.splitlines() if "[(" in line]
    assert ranges["1"] == [1, 1]  # one colour range per figure
    assert all(n > 1 for n in ranges["0"])  # each panel its own


def test_sweep_point_of_an_experiment_comes_from_its_sweeper_params(tmp_path):
    """``experiment=fig4_rprime`` sweeps through ``hydra.sweeper.params`` (method x r'): a job's
    point is its r' (the method is in the name already), not the other overrides it was given."""
    from helpers import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from pilora.runner import wandb as w

    job = ["experiment=fig4_rprime", "method=lora_matched", "method.supplementary_r=4", "trainer.max_steps=3"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*job, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    HydraConfig.instance().set_config(cfg)  # conftest puts the previous one back after the test
    assert w.sweep_point(plain, str(tmp_path / "job")) == {"method.supplementary_r": "4"}
    # the sweep's own record of its command line (Hydra's basic sweeper writes multirun.yaml)
    OmegaConf.save({"hydra": {"overrides": {"task": ["trainer.max_steps=3,5"]}}}, tmp_path / "multirun.yaml")
    point = w.sweep_point(plain, str(tmp_path / "job"))
    assert point == {"method.supplementary_r": "4", "trainer.max_steps": "3"}
    assert w.run_name(plain, point) == "lora_matched-commonsense170k-llama2-7b-s0-supplementary_r=4-max_steps=3"
    assert w.run_group(plain, point) == "fig4_rprime"


def test_a_torn_run_file_reads_up_to_its_tear_and_garbage_is_named(sweep, tmp_path, capsys):
    """A job killed mid-write leaves a torn ``.wandb`` tail: W&B's reader gives the records before
    it (run, config; no exit: state ``running``). A file that is no W&B log is skipped, by path."""
    import shutil

    from analysis import wandb_source
    from analysis.wandb_runs import OfflineRunError, read_run

    run = _runs(sweep)["pilora-eurosat-tiny-clip-s0"]
    (path,) = glob.glob(os.path.join(run["path"], "run-*.wandb"))
    torn = tmp_path / "torn" / "wandb" / "offline-run-x" / os.path.basename(path)
    torn.parent.mkdir(parents=True)
    data = open(path, "rb").read()
    torn.write_bytes(data[: len(data) - 200])
    item = read_run(str(torn))
    assert item["name"] == run["name"] and item["config"] == run["config"] and item["state"] == "running"
    assert run["state"] == "finished"
    bad = tmp_path / "torn" / "wandb" / "offline-run-y" / "run-y.wandb"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a wandb log")
    with pytest.raises(OfflineRunError, match="not a readable W&B transaction log"):
        read_run(str(bad))
    shutil.copytree(os.path.join(run["path"], "files"), torn.parent / "files")
    df = wandb_source.load_wandb_dir(str(tmp_path / "torn"))
    assert str(bad) in capsys.readouterr().err and len(df) == 1  # the torn run, from its record copy


def _isolated_wandb(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # W&B's staging, inside the test
        monkeypatch.setenv(k, str(tmp_path / k.lower()))


def test_a_rerun_continues_the_jobs_run_and_the_newest_record_wins(tmp_path, monkeypatch):
    """A job interrupted at step 2 and rerun logs into the same W&B run (one id, the rerun's folder
    finishing it), not a second run of the same name; a rerun with ``resume=false`` opens a new run,
    and reading the W&B folders keeps its record, the newer one, as the local reader does."""
    import torch
    from helpers import write_images

    from analysis import records, tables, wandb_source
    from analysis.wandb_runs import find_offline_runs, read_run
    from pilora.runner import wandb as logging_wandb
    from pilora.runner.train import train

    _isolated_wandb(monkeypatch, tmp_path)
    img = str(tmp_path / "img")
    write_images(img)
    out = tmp_path / "multirun" / "tiny" / "method=lora,seed=0"
    over = QUICK + _vision(img) + ["method=lora", "trainer.save_strategy=steps", "trainer.save_steps=1"]
    real = logging_wandb.StageLogger.on_log

    def preempted(self, args, state, control, logs=None, **kw):
        real(self, args, state, control, logs=logs, **kw)
        if state.global_step == 2:
            raise RuntimeError("preempted")

    monkeypatch.setattr(logging_wandb.StageLogger, "on_log", preempted)
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="preempted"):
        train(compose_cfg(over, out))
    first = logging_wandb.saved_run_id(str(out))
    assert first
    monkeypatch.setattr(logging_wandb.StageLogger, "on_log", real)
    rec = train(compose_cfg(over, out))
    assert rec["status"] == "complete" and rec["steps"] == 3 and rec["wandb"]["id"] == first
    runs = [read_run(p) for p in find_offline_runs(str(out))]
    assert {r["id"] for r in runs} == {first} and sorted(r["state"] for r in runs) == ["failed", "finished"]
    (done,) = [r for r in runs if r["state"] == "finished"]
    assert done["summary"]["steps"] == 3 and done["record"] == json.loads(json.dumps(rec))

    again = train(compose_cfg(over + ["resume=false"], out))
    assert again["wandb"]["id"] not in (None, first) and logging_wandb.saved_run_id(str(out)) == again["wandb"]["id"]
    df = wandb_source.load_wandb_dir(str(tmp_path / "multirun"))
    assert list(df["wandb_id"]) == [again["wandb"]["id"]]  # of the two complete runs, the newer
    local = records.load_records(str(tmp_path / "multirun"))
    ours = tables.render(local, ["3"], "best", False, "adapter_share", False, cost=True)
    assert tables.render(df, ["3"], "best", False, "adapter_share", False, cost=True) == ours


def test_wandb_mode_disabled_logs_no_run(tmp_path, monkeypatch):
    """``WANDB_MODE=disabled`` (W&B's own switch, read by ``logger.mode``) turns logging off as
    ``logger=none`` does; the job neither fails on W&B's dummy run nor records a run it did not log."""
    from helpers import write_images

    from pilora.runner.train import train

    _isolated_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_images(str(tmp_path / "img"))
    cfg = compose_cfg(
        [x for x in QUICK if x != "logger.mode=offline"] + _vision(str(tmp_path / "img")), tmp_path / "run"
    )
    assert cfg["logger"]["mode"] == "disabled"
    rec = train(cfg)
    assert rec["status"] == "complete" and rec["steps"] == 3 and "wandb" not in rec
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_copied_run_folder_carries_the_predictions(tmp_path, monkeypatch):
    """The record artifact's every file (``predictions/<set>.jsonl`` of a generation task too) is
    also in the run's ``files/``: a ``wandb/`` folder copied without W&B's staging folder reads back."""
    import shutil

    from helpers import write_images

    from analysis import wandb_source
    from pilora.runner import wandb as logging_wandb
    from pilora.runner.train import train

    _isolated_wandb(monkeypatch, tmp_path)
    write_images(str(tmp_path / "img"))
    out = tmp_path / "job"
    real = logging_wandb.finish_run

    def with_predictions(run, record, cfg, where, files):  # what a generation task's evaluation writes
        os.makedirs(os.path.join(where, "predictions"), exist_ok=True)
        with open(os.path.join(where, "predictions", "boolq.jsonl"), "w") as f:
            f.write('{"id": 0, "correct": true}\n')
        return real(run, record, cfg, where, files)

    monkeypatch.setattr(logging_wandb, "finish_run", with_predictions)
    train(compose_cfg(QUICK + _vision(str(tmp_path / "img")) + ["method=lora"], out))
    copy = tmp_path / "copied" / "job" / "wandb"
    shutil.copytree(out / "wandb", copy, symlinks=False)
    shutil.rmtree(tmp_path / "wandb_data_dir")  # W&B's staging folder: not on the machine the folder went to
    (kept,) = glob.glob(str(copy / "offline-run-*" / "files" / "predictions" / "boolq.jsonl"))
    assert open(kept).read() == open(out / "predictions" / "boolq.jsonl").read()
    df = wandb_source.load_wandb_dir(str(tmp_path / "copied"))
    assert len(df) == 1 and df["wandb_id"].tolist() == [json.load(open(out / "results.json"))["wandb"]["id"]]
