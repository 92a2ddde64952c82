"""analysis/: records -> DataFrame, Tables 1-4, figures and notebooks, on REAL records.

A session fixture runs a tiny sweep through the project's own trainer (tiny CLIP on generated
images, tiny RoBERTa on a generated GLUE-style csv; about a second per job): LoRA and PiLoRA x 2
seeds, PiLoRA on a second dataset, and PiLoRA sweeps over r', the dominant rank and the
cumulative threshold that reuse one stage 1 through ``method.importance_from``. The tests compute
what they expect straight from the results.json files, independently of ``analysis``.
"""

import asyncio
import csv
import glob
import json
import os
import statistics
import sys

import numpy as np
import pytest
from helpers import FAST, compose_cfg, table_rows, vision_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = FAST + ["trainer.save_strategy=no", "save_adapter=false"]
PILORA = ["method=pilora", "method.stage1.max_steps=3", "method.importance_interval=1"]


def _write_images(d, n_train=24, n_test=24, seed=0):
    """Two overlapping noisy colour classes: learnable, but not perfectly in 3 steps, so seeds differ."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for label in (0, 1):
            os.makedirs(os.path.join(d, split, str(label)), exist_ok=True)
            for i in range(count // 2):
                px = np.array([150 + (25 if label else -25), 120, 120]) + rng.normal(0, 60, (16, 16, 3))
                out = os.path.join(d, split, str(label), f"{i}.png")
                Image.fromarray(np.clip(px, 0, 255).astype("uint8")).save(out)


def _vision(d, task):
    return vision_overrides(d, task) + ["trainer.max_steps=3"]


def _glue(d):
    """Train labels follow a keyword, validation labels are inverted: validation accuracy falls as the
    model learns, so the best epoch (first) and the final epoch differ."""
    os.makedirs(d, exist_ok=True)
    for split, n in (("train", 64), ("validation", 32)):
        with open(os.path.join(d, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            for i in range(n):
                word = "good" if i % 2 else "bad"
                w.writerow([f"{word} {word} {word}", i % 2 if split == "train" else 1 - i % 2])
    return [
        "task=glue/cola",
        "task.dataset.path=csv",
        "task.dataset.name=null",
        "model=tiny-roberta",
        # the sentence alone: GOAT's instruction, spelled out in characters by the tiny tokenizer,
        # buries the keyword deeper than 3 epochs of the tiny model learn (accuracy stays 0.5)
        "task.template='{sentence}'",
        "trainer.learning_rate=1e-2",
        "trainer.per_device_train_batch_size=16",
        "trainer.num_train_epochs=3",
        "method=lora",
    ] + [f"+task.dataset.data_files.{s}={d}/{s}.csv" for s in ("train", "validation")]


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """A results tree laid out like Hydra's multirun/ folders, made by the real trainer."""
    import torch

    from pilora.runner.train import train

    base = tmp_path_factory.mktemp("analysis")
    img, root = str(base / "img"), base / "results"
    _write_images(img)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test sessions share the CPUs
    try:

        def job(sweep, sub, overrides):
            return train(compose_cfg(QUICK + overrides, root / "multirun" / sweep / sub))

        for method in ("lora", "pilora"):
            for seed in (0, 1):
                extra = PILORA if method == "pilora" else ["method=lora"]
                job("vision", f"method={method},seed={seed}", _vision(img, "eurosat") + extra + [f"seed={seed}"])
        job("vision_dtd", "method=pilora", _vision(img, "dtd") + PILORA)
        stage1 = str(root / "multirun" / "vision" / "method=pilora,seed=0" / "importance.pt")
        reuse = _vision(img, "eurosat") + PILORA + [f"method.importance_from='{stage1}'"]  # quoted: = and ,
        for rs in (0, 1):  # r' = 1 repeats the seed-0 main run: a duplicate the loader must drop
            job("fig4_rprime", f"method.supplementary_r={rs}", reuse + [f"method.supplementary_r={rs}"])
        job("fig5_rank", "method.r=4", reuse + ["method.r=4"])
        for th in (0.5, 0.9):
            job(
                "fig6_group",
                f"threshold={th}",
                reuse + ["method/partition=cumulative", f"method.partition.args.threshold={th}"],
            )
        for seed in (0, 1):
            job("glue", f"seed={seed}", _glue(str(base / "glue")) + [f"seed={seed}"])
    finally:
        torch.set_num_threads(threads)
    return root


def _raw(root):
    """Every record, read straight from disk (no analysis code)."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
        with open(path) as f:
            out.append((path, json.load(f)))
    return out


def _pick(root, sweep=None, **where):
    recs = []
    for path, r in _raw(root):
        if sweep and f"{os.sep}{sweep}{os.sep}" not in path:
            continue
        if all(
            (r["config"]["method"].get(k) if k in ("r", "supplementary_r") else r.get(k)) == v for k, v in where.items()
        ):
            recs.append(r)
    return recs


def _cell(values, d=2):
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{d}f} (n=1)"  # one seed: the count, no spread
    return f"{statistics.mean(values):.{d}f} ± {statistics.stdev(values):.{d}f} (n={len(values)})"


# ----------------------------------------------------------------------------- records


def test_load_records_one_row_per_job_with_record_values(tree, capsys):
    from analysis.records import load_records

    df = load_records(tree)
    raw = _raw(tree)
    err = capsys.readouterr().err
    # the r'=1 sweep point repeats the seed-0 main run (same config, same seed): one is dropped, by name
    dup = [p for p, _ in raw if "supplementary_r=1" in p][0]
    assert f"ignoring {dup}" in err and len(df) == len(raw) - 1 == 11
    assert dup not in set(df["path"])
    for path, rec in raw:
        if path == dup:
            continue
        row = df[df["path"] == path].iloc[0]
        assert (row.task, row.method, row.model, row.seed) == (rec["task"], rec["method"], rec["model"], rec["seed"])
        assert row.adapter_share == rec["params"]["adapter_share"] and row.params_adapter == rec["params"]["adapter"]
        assert row.r == rec["config"]["method"]["r"] and row.git_revision == rec["git"]["revision"]
        assert row.time_total_s == rec["timing"]["total_s"]
        for k, v in rec["metrics"]["test"].items():
            assert row[k] == v
        assert row.best_eval_accuracy == rec["metrics"]["best"]["eval_accuracy"]
        if rec["method"] == "pilora":
            assert row.dominant_fraction == rec["pilora"]["dominant_fraction"]
            assert row.partition == rec["pilora"]["partition"]
    # seeds of one configuration share a key; anything else that differs splits it
    keys = df.set_index("path")["config_key"]
    vis = os.path.join(str(tree), "multirun", "vision")
    k = {
        s: keys[os.path.join(vis, s, "results.json")]
        for s in ("method=lora,seed=0", "method=lora,seed=1", "method=pilora,seed=0", "method=pilora,seed=1")
    }
    assert k["method=lora,seed=0"] == k["method=lora,seed=1"] != k["method=pilora,seed=0"] == k["method=pilora,seed=1"]
    sweeps = df[df["importance_from"].notna()]
    assert sweeps["config_key"].nunique() == len(sweeps) == 4 and not set(sweeps["config_key"]) & set(k.values())


def test_bad_records_are_skipped_with_one_line_each(tree, tmp_path, capsys):
    from analysis.records import load_records

    good_path, good = _raw(tree)[0]
    os.makedirs(tmp_path / "ok")
    json.dump(good, open(tmp_path / "ok" / "results.json", "w"))
    old = dict(good, schema=0)
    os.makedirs(tmp_path / "old")
    json.dump(old, open(tmp_path / "old" / "results.json", "w"))
    broken = {k: v for k, v in good.items() if k != "params"}
    os.makedirs(tmp_path / "noparams")
    json.dump(broken, open(tmp_path / "noparams" / "results.json", "w"))
    os.makedirs(tmp_path / "torn")
    (tmp_path / "torn" / "results.json").write_text('{"schema": 1, "status": "comp')
    df = load_records(tmp_path)
    err = capsys.readouterr().err
    assert len(df) == 1 and df.iloc[0]["path"] == str(tmp_path / "ok" / "results.json")
    lines = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(lines) == 3 and "Traceback" not in err
    assert any(str(tmp_path / "old" / "results.json") in line and "schema 0" in line for line in lines)
    assert any(str(tmp_path / "noparams" / "results.json") in line and "params" in line for line in lines)
    assert any(str(tmp_path / "torn" / "results.json") in line for line in lines)


def _copy_records(tree, dst, sweep, edit=None, **where):
    """Copies of the ``sweep`` records matching ``where`` under ``dst`` (``edit(i, rec)`` changes copy i)."""
    paths = []
    for i, (path, rec) in enumerate(
        (p, r)
        for p, r in _raw(tree)
        if f"{os.sep}{sweep}{os.sep}" in p and all(r.get(k) == v for k, v in where.items())
    ):
        rec = json.loads(json.dumps(rec))
        if edit:
            edit(i, rec)
        folder = dst / f"{sweep}_{i}"
        os.makedirs(folder)
        json.dump(rec, open(folder / "results.json", "w"))
        paths.append(str(folder / "results.json"))
    return paths


def test_a_mistyped_record_is_skipped_not_every_table(tree, tmp_path, capsys):
    """``params.adapter_share: "x"`` in one record: a warning naming the file, the other tables stand."""
    from analysis.tables import main

    def mistype(i, rec):
        if i == 0:
            rec["params"]["adapter_share"] = "x"

    paths = _copy_records(tree, tmp_path, "vision", mistype, task="eurosat", method="lora")
    _copy_records(tree, tmp_path, "glue")
    assert main(["--root", str(tmp_path), "--table", "2", "3"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping {paths[0]}: params.adapter_share is 'x' (str), not a number" in err
    assert "Traceback" not in err
    (lora,) = table_rows(out, "tiny-clip", "LoRA")
    assert any("(n=1)" in cell for cell in lora)  # the other seed's record is used
    assert table_rows(out, "tiny-roberta", "LoRA")  # and Table 2 is built


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("eval_accuracy", "0.93", "metrics.best.eval_accuracy is '0.93' (str), not a number"),
        ("eval_accuracy", float("nan"), "metrics.best.eval_accuracy is nan, not a finite number"),
        ("eval_accuracy", 7.5, "metrics.best.eval_accuracy is 7.5, outside the metric's range [0, 1]"),
        ("eval_mcc", 1.5, "metrics.best.eval_mcc is 1.5, outside the metric's range [-1, 1]"),  # CoLA's MCC
    ],
)
def test_impossible_metrics_are_skipped_by_file_never_averaged(tree, tmp_path, capsys, key, value, reason):
    """A record whose best accuracy is a string, NaN or 7.5 (750 %), or whose MCC is 1.5: one
    warning naming the file, and the configuration's mean is that of the other seed alone."""
    from analysis.records import load_records

    def damage(i, rec):
        if i == 0:
            rec["metrics"]["best"][key] = value

    paths = _copy_records(tree, tmp_path, "vision", damage, task="eurosat", method="lora")
    assert len(paths) == 2
    df = load_records(tmp_path)
    err = capsys.readouterr().err
    assert f"warning: skipping {paths[0]}: {reason}" in err and "Traceback" not in err
    assert list(df["path"]) == [paths[1]]
    assert df["best_eval_accuracy"].mean() == json.load(open(paths[1]))["metrics"]["best"]["eval_accuracy"]


def test_records_of_different_revisions_warn_and_revision_filters(tree, tmp_path, capsys):
    from analysis.tables import main

    revs = ["1" * 40, "2" * 40]

    def stamp(i, rec):
        rec["git"] = {"revision": revs[i], "dirty": False}

    paths = _copy_records(tree, tmp_path, "vision", stamp, task="eurosat", method="lora")
    assert len(paths) == 2
    assert main(["--root", str(tmp_path), "--table", "3"]) == 0
    out, err = capsys.readouterr()
    assert "warning: 1 configuration(s) average records from different code" in err
    assert "1111111111, 2222222222" in err and paths[0] in err and "--revision REV" in err
    assert any("(n=2)" in c for c in table_rows(out, "tiny-clip", "LoRA")[0])
    assert main(["--root", str(tmp_path), "--table", "3", "--revision", "2222"]) == 0
    out, err = capsys.readouterr()
    assert "different code" not in err and "--revision 2222: 1 of 2 record(s) kept" in err
    rec = json.load(open(paths[1]))
    assert f"{_cell([rec['metrics']['test']['test_accuracy']])} / —" in table_rows(out, "tiny-clip", "LoRA")[0]
    # one revision, but a tree with uncommitted changes: the code behind the records is unknown
    for p in paths:
        rec = json.load(open(p))
        rec["git"] = {"revision": revs[0], "dirty": True}
        json.dump(rec, open(p, "w"))
    assert main(["--root", str(tmp_path), "--table", "3"]) == 0
    assert "1111111111 (dirty)" in capsys.readouterr().err


def _stamp(revision):
    """An ``edit`` for :func:`_copy_records`: the copy comes from git revision ``revision``."""

    def edit(i, rec):
        rec["git"] = {"revision": revision, "dirty": False}

    return edit


def _wandb_cache(cache, paths, created_at):
    """A W&B cache (as ``load_wandb`` pulls it) of the runs whose uploaded records are ``paths``."""
    runs = [
        {"id": f"run{i}", "path": f"me/proj/run{i}", "state": "finished", "created_at": created_at[i]}
        | {"commit": json.load(open(p))["git"]["revision"], "config": {}, "summary": {}, "record": json.load(open(p))}
        for i, p in enumerate(paths)
    ]
    os.makedirs(cache, exist_ok=True)
    json.dump({"project": "proj", "entity": "me", "runs": runs}, open(os.path.join(cache, "me__proj.json"), "w"))


@pytest.mark.parametrize("source", ["root", "wandb"])
def test_revision_picks_its_records_before_duplicates_are_dropped(tree, tmp_path, capsys, source):
    """Both GLUE seeds ran at revision 1111…, then again at 2222… (same configuration and seed, newer).
    ``--revision 1111`` is those two records: not none, which is what is left when the duplicates of
    another revision are dropped first (the newer twin wins and is then filtered out)."""
    from analysis.tables import main

    old = _copy_records(tree, tmp_path / "old", "glue", _stamp("1" * 40))
    new = _copy_records(tree, tmp_path / "new", "glue", _stamp("2" * 40))
    for p in old:
        os.utime(p, (1e9, 1e9))  # the older twins: drop_duplicates keeps the newer one of each seed
    if source == "root":
        argv = ["--root", str(tmp_path / "old"), "--root", str(tmp_path / "new")]
    else:
        _wandb_cache(str(tmp_path / "cache"), old + new, ["2026-01-01T00:00:00Z"] * 2 + ["2026-02-01T00:00:00Z"] * 2)
        argv = ["--wandb", "me/proj", "--wandb-cache", str(tmp_path / "cache")]
    assert main(argv + ["--table", "2", "--revision", "1111", "--no-cost"]) == 0
    out, err = capsys.readouterr()
    assert "--revision 1111: 2 of 4 record(s) kept" in err
    best = [json.load(open(p))["metrics"]["best"]["eval_accuracy"] for p in old]
    (lora,) = table_rows(out, "tiny-roberta", "LoRA")
    assert lora[3] == f"{_cell(best)} / —"


def test_the_saved_table_says_what_was_left_out(tree, tmp_path, capsys):
    """``--out x.md`` holds, under the tables, what stderr said about the records: the failed run
    (so CoLA's n=1 is not read as one seed run), the duplicate left out, the revisions averaged
    together (SST-2) and a folder that does not exist."""
    from analysis.records import load_records
    from analysis.tables import main

    def fail(i, rec):
        if i == 1:
            rec["status"] = "failed"

    def sst2(i, rec):
        rec["task"] = rec["config"]["task"]["name"] = "sst2"
        _stamp(str(i + 1) * 40)(i, rec)

    runs = _copy_records(tree, tmp_path / "table2", "glue", fail)
    again = _copy_records(tree, tmp_path / "old_sweep", "glue", _stamp("9" * 40), seed=0)
    os.utime(again[0], (1e9, 1e9))  # the older twin is the one left out
    mixed = _copy_records(tree, tmp_path / "sst2", "glue", sst2)
    out_file = tmp_path / "x.md"
    argv = ["--root", str(tmp_path), "--root", str(tmp_path / "nowhere"), "--table", "2", "--out", str(out_file)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"skipping {runs[1]}" in err and f"ignoring {again[0]}" in err and "different code" in err
    text = out_file.read_text()
    notes = text[text.index("Notes on the records:") :]  # what stderr said, under the tables
    failed, dup, kept = (os.path.dirname(p) for p in (runs[1], again[0], runs[0]))
    assert f"- No such folder: {tmp_path / 'nowhere'}." in notes
    assert f"- 1 record(s) skipped, in no table: {failed} (status 'failed', not 'complete')." in notes
    assert f"- 1 duplicate(s) of a configuration and seed left out: {dup} (kept: {kept})." in notes
    assert "- 1 configuration(s) average records of different git revisions" in notes
    (key,) = set(load_records(str(tmp_path / "sst2"), quiet=True)["config_key"])
    assert f"sst2/tiny-roberta/lora [{key}]: 1111111111, 2222222222." in notes
    assert all(p in err for p in mixed)
    (lora,) = table_rows(text, "tiny-roberta", "LoRA")
    assert "(n=1)" in lora[3] and "(n=2)" in lora[4]  # CoLA: one seed left; SST-2: both


def test_wandb_pull_is_cached_and_used_when_the_api_fails(tree, tmp_path, capsys, monkeypatch):
    import wandb

    from analysis.records import load_records
    from analysis.wandb_source import WandbSourceError, load_wandb
    from pilora.runner.wandb import summary_of

    local = load_records(tree)
    recs = [r for _, r in _raw(tree) if r["task"] == "eurosat" and r["method"] == "lora"]

    class Run:  # what wandb.Api().runs() yields, as train.py logs it (config + summary, no files)
        def __init__(self, rec):
            self.id, self.name, self.state = f"run{rec['seed']}", "x", "finished"
            self.path = ["me", "proj", self.id]
            self.config, self.commit = rec["config"], rec["git"]["revision"]
            self.summary = summary_of(rec, rec["config"])  # the runner's own summary
            self.created_at = f"2026-01-0{rec['seed'] + 1}T00:00:00Z"

        def files(self):
            return []

    class Api:
        def __init__(self, *a, **k):
            pass

        def runs(self, path, filters=None):
            assert path == "me/proj"
            return [Run(r) for r in recs]

    monkeypatch.setattr(wandb, "Api", Api)
    first = load_wandb("proj", "me", cache_dir=str(tmp_path / "cache"))
    assert len(first) == 2 and set(first["seed"]) == {0, 1}
    lora = local[(local.task == "eurosat") & (local.method == "lora")].sort_values("seed")
    assert list(first.sort_values("seed")["test_accuracy"]) == list(lora["test_accuracy"])
    assert set(first["config_key"]) == set(lora["config_key"])  # same grouping as local records

    class Down:
        def __init__(self, *a, **k):
            raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "Api", Down)
    capsys.readouterr()
    again = load_wandb("proj", "me", cache_dir=str(tmp_path / "cache"), refresh=True)
    err = capsys.readouterr().err
    assert "not reachable" in err and "cache" in err and "Traceback" not in err
    assert list(again["test_accuracy"]) == list(first["test_accuracy"])
    with pytest.raises(WandbSourceError, match="not reachable for me/proj .* no local cache"):
        load_wandb("proj", "me", cache_dir=str(tmp_path / "nocache"))
    from analysis.tables import main

    assert main(["--wandb", "me/proj", "--wandb-cache", str(tmp_path / "nocache")]) == 2  # not a table without runs
    err = capsys.readouterr().err
    assert "no local cache" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- tables


def test_table3_cells_are_the_records_mean_and_std(tree):
    from analysis.records import load_records
    from analysis.tables import render

    text = render(load_records(tree, quiet=True), ["3"])
    (lora,) = table_rows(text, "tiny-clip", "LoRA")
    header = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| Model")).strip("|").split(" | ")]
    col = {name: i for i, name in enumerate(header)}
    vals = [r["metrics"]["test"]["test_accuracy"] for r in _pick(tree, "vision", task="eurosat", method="lora")]
    assert len(vals) == 2 and len(set(vals)) == 2  # two seeds that really differ
    assert lora[col["EuroSAT"]] == f"{_cell(vals)} / —"
    assert lora[col["DTD"]] == "— / —" and lora[col["Average"]] == "— / —"  # missing runs, no invented average
    runs = _pick(tree, "vision", method="lora")
    shares = [100 * r["params"]["adapter_share"] for r in runs]
    of_backbone = [100 * r["params"]["adapter_share_of_backbone"] for r in runs]  # both bases, as the paper mixes them
    assert lora[col["# Params (%)"]] == f"{statistics.mean(shares):.2f} ({statistics.mean(of_backbone):.2f}) / —"
    # PiLoRA: one row per configuration, never averaged together
    pil = table_rows(text, "tiny-clip", "PiLoRA")
    assert len(pil) == 5 and len({r[1] for r in pil}) == 5
    main = next(r for r in pil if "r'=1" in r[1] and "r=8" in r[1] and "hit_frequency" in r[1])
    main_vals = [r["metrics"]["test"]["test_accuracy"] for r in _pick(tree, "vision", task="eurosat", method="pilora")]
    assert main[col["EuroSAT"]] == f"{_cell(main_vals)} / —"
    dtd = _pick(tree, "vision_dtd")[0]["metrics"]["test"]["test_accuracy"]
    assert main[col["DTD"]] == f"{_cell([dtd])} / —" and "±" not in main[col["DTD"]]  # one seed: no std
    r0 = next(r for r in pil if "r'=0" in r[1])
    r0_val = _pick(tree, "fig4_rprime", supplementary_r=0)[0]["metrics"]["test"]["test_accuracy"]
    assert r0[col["EuroSAT"]] == f"{_cell([r0_val])} / —"
    assert sum("threshold=" in r[1] for r in pil) == 2 and any("r=4" in r[1] for r in pil)
    # the paper's rows, numbers as printed, with — for ours (its model is not in the tree)
    paper = table_rows(text, "CLIP ViT-B/32", "PiLoRA")[0]
    assert paper[col["Cars"]] == "— / 55.38" and paper[col["Average"]] == "— / 81.86" and paper[2] == "— / 1.21"
    assert table_rows(text, "CLIP ViT-B/32", "Full FT †")[0][col["# Params (%)"]] == "— / 100"


def test_table2_best_or_final_epoch(tree):
    from analysis.records import load_records
    from analysis.tables import build_table, render

    df = load_records(tree, quiet=True)
    recs = _pick(tree, "glue")
    best = [r["metrics"]["best"]["eval_accuracy"] for r in recs]
    final = [r["metrics"]["final"]["eval_accuracy"] for r in recs]
    assert best != final  # the fixture makes them differ
    for which, vals in (("best", best), ("final", final)):
        (row,) = table_rows(render(df, ["2"], which=which), "tiny-roberta", "LoRA")
        assert row[3] == f"{_cell(vals)} / —"
    t = build_table(df, "2")
    (row,) = [r for r in t.rows if r.model == "tiny-roberta"]
    assert row.cells["cola"].n == 2 and row.cells["cola"].seeds == [0, 1] and row.cells["sst2"] is None
    assert "| RoBERTa-large | PiLoRA | — / 3.26 | — / 85.52 |" in render(df, ["2"])
    assert "tiny-clip" not in render(df, ["2"]) and "tiny-" not in render(df, ["1", "4"])


def test_a_configuration_matching_the_paper_sits_on_the_paper_row(tree):
    """Rename the tiny model as the paper's: the main PiLoRA config (r=8, r'=1, τ=0.5) joins the
    paper's row, the sweep configurations stay extra rows with — for the paper."""
    from analysis.records import load_records
    from analysis.tables import build_table

    df = load_records(tree, quiet=True)
    df = df.assign(model=df["model"].replace({"tiny-clip": "clip-vit-b32"}))
    df["config"] = [{**c, "trainer.learning_rate": 1e-4} for c in df["config"]]  # the paper's lr
    t = build_table(df, "3")
    paper_row = next(r for r in t.rows if r.paper and r.paper["method"] == "PiLoRA")
    vals = [100 * r["metrics"]["test"]["test_accuracy"] for r in _pick(tree, "vision", task="eurosat", method="pilora")]
    assert paper_row.cells["eurosat"].values == pytest.approx(vals) and paper_row.paper["values"]["eurosat"] == 98.59
    extra = [r for r in t.rows if r.paper is None and r.row_id == "pilora"]
    assert len(extra) == 4 and all(r.label for r in extra)
    lora = next(r for r in t.rows if r.paper and r.paper["method"] == "LoRA")
    assert lora.cells["eurosat"].n == 2 and lora.cells["cars"] is None


COMMONSENSE_SETS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
)


def _commonsense(sets=COMMONSENSE_SETS, **method):
    """An ``edit`` for :func:`_copy_records`: a PiLoRA record becomes a LLaMA2-7B Commonsense170K run
    in Table 1's setting (r = 32, α = 64, r' = 2, lr 2e-4; ``method`` changes more), scored
    70 % + seed % on each of ``sets``."""

    def edit(i, rec):
        acc = 0.70 + 0.01 * rec["seed"]
        rec.update(task="commonsense170k", family="generation", model="llama2-7b")
        rec["config"]["task"].update(name="commonsense170k", family="generation")
        rec["config"]["model"]["name"] = "llama2-7b"
        rec["config"]["trainer"]["learning_rate"] = 2e-4
        rec["config"]["method"].update({"r": 32, "alpha": 64, "supplementary_r": 2} | method)
        rec["metrics"]["test"] = {f"test_{s}_accuracy": acc for s in sets} | {"test_avg_accuracy": acc}
        rec["evaluation"]["headline"] = {"metric": "test_avg_accuracy", "split": "test", "from": "test"}

    return edit


def _llama2_rows(table):
    """Table ``table``'s LLaMA2-7B PiLoRA rows: the paper's row (PiLoRA; Table 4: Ours), then ours."""
    rows = [r for r in table.rows if r.model_config == "llama2-7b"]
    (paper,) = [r for r in rows if r.paper and r.paper["method"] in ("PiLoRA", "Ours")]
    return paper, [r for r in rows if r.paper is None]


def test_a_stage1_rank_written_out_is_the_run_that_left_it_null(tree, tmp_path, capsys):
    """Table 1's PiLoRA runs leave method.stage1_r null (= r); fig5_rank writes 32 at every point.
    At r = 32 that is the same training: both seeds stay on the paper's row of Tables 1 and 4, the
    r = 32 point is seed 0's duplicate, and only the r = 24 point is a row of its own."""
    from analysis.records import load_records
    from analysis.tables import build_table

    main = _copy_records(tree, tmp_path / "table1", "vision", _commonsense(), task="eurosat", method="pilora")
    reuse = {"stage1_r": 32, "importance_from": "multirun/table1_llama2/method=pilora,seed=0/importance.pt"}
    (at_32,) = _copy_records(
        tree, tmp_path / "r32", "vision", _commonsense(**reuse), task="eurosat", method="pilora", seed=0
    )
    _copy_records(
        tree, tmp_path / "r24", "vision", _commonsense(r=24, alpha=48, **reuse), task="eurosat", method="pilora", seed=0
    )
    assert [json.load(open(p))["config"]["method"]["stage1_r"] for p in main] == [None, None]
    df = load_records(tmp_path)
    err = capsys.readouterr().err
    for table in ("1", "4"):
        paper, ours = _llama2_rows(build_table(df, table))
        assert paper.cells["boolq"].values == pytest.approx([70, 71]) and paper.cells["boolq"].seeds == [0, 1]
        assert paper.avg.mean == pytest.approx(70.5)
        assert [r.label for r in ours] == ["r=24"] and ours[0].cells["openbookqa"].values == pytest.approx([70])
    assert f"ignoring {at_32}: same configuration and seed as {main[0]}" in err


def test_an_unset_stage1_rank_keeps_the_paper_row_beside_a_set_one(tree, tmp_path):
    """Beside Table 1's runs (stage1_r null), a run at stage-1 rank 16: the stage-1 rank tells the two
    apart, but only the second sets one; the first is still the paper's setting (null = r = 32)."""
    from analysis.records import load_records
    from analysis.tables import build_table

    _copy_records(tree, tmp_path / "table1", "vision", _commonsense(), task="eurosat", method="pilora")
    _copy_records(tree, tmp_path / "s16", "vision", _commonsense(stage1_r=16), task="eurosat", method="pilora", seed=0)
    paper, ours = _llama2_rows(build_table(load_records(tmp_path, quiet=True), "1"))
    assert paper.cells["piqa"].values == pytest.approx([70, 71])
    assert [r.label for r in ours] == ["stage-1 r=16"] and ours[0].cells["piqa"].n == 1


# Tab. 6: each GLUE task's learning rate and epochs
TAB6 = {
    "cola": (2e-4, 10),
    "sst2": (1e-4, 10),
    "mrpc": (1e-4, 10),
    "qqp": (2e-4, 10),
    "mnli": (1e-4, 10),
    "qnli": (1e-4, 10),
    "rte": (2e-4, 50),
}


def _glue_at(task, lr, epochs, model=None):
    """An ``edit`` for :func:`_copy_records`: a GLUE record becomes a run of ``task`` at ``lr`` and
    ``epochs``; with ``model``, one of that model at the paper's r = 8."""

    def edit(i, rec):
        rec["task"] = rec["config"]["task"]["name"] = task
        rec["config"]["trainer"].update(learning_rate=lr, num_train_epochs=epochs)
        if model:
            rec["model"] = rec["config"]["model"]["name"] = model
            rec["config"]["method"]["r"] = 8

    return edit


def test_per_task_learning_rates_keep_one_row_and_a_stray_run_gets_its_own(tree, tmp_path):
    """Both GLUE seeds on every task at its Tab. 6 lr and epochs, and one stray CoLA run at lr 1e-4
    (SST-2's). The lr tells CoLA's two configurations apart, and only CoLA's: the other six tasks
    stay in one row, none of them joins the stray's row because its own lr is 1e-4 too."""
    from analysis.records import load_records
    from analysis.tables import build_table

    for task, (lr, epochs) in TAB6.items():
        _copy_records(tree, tmp_path / task, "glue", _glue_at(task, lr, epochs))
    (stray,) = _copy_records(tree, tmp_path / "stray", "glue", _glue_at("cola", 1e-4, 10), seed=0)
    best = [r["metrics"]["best"]["eval_accuracy"] for r in _pick(tree, "glue")]
    rows = {r.label: r for r in build_table(load_records(tmp_path, quiet=True), "2").rows if r.model == "tiny-roberta"}
    assert sorted(rows) == ["", "lr=0.0001", "lr=0.0002"]
    assert {t for t, s in rows[""].cells.items() if s} == set(TAB6) - {"cola"}
    assert all(s.values == pytest.approx([100 * v for v in best]) for s in rows[""].cells.values() if s)
    assert {t for t, s in rows["lr=0.0002"].cells.items() if s} == {"cola"}  # CoLA's sweep at its Tab. 6 lr
    assert rows["lr=0.0002"].cells["cola"].n == 2
    assert {t for t, s in rows["lr=0.0001"].cells.items() if s} == {"cola"}  # the stray run alone
    assert rows["lr=0.0001"].cells["cola"].values == [100 * json.load(open(stray))["metrics"]["best"]["eval_accuracy"]]


def test_the_paper_row_holds_each_glue_task_at_its_own_tab6_settings(tree, tmp_path):
    """RoBERTa-large LoRA runs: every task at its Tab. 6 lr and epochs, beside one CoLA run at lr 1e-4
    and RTE run at 10 epochs only (their cells' only runs of that setting). The paper's row holds
    each task's Tab. 6 runs, all of them (CoLA's, labelled by its lr in its own cell, replaced the
    other tasks' on that row), and the runs off Tab. 6 get rows named by what differs, even where
    nothing else in their cell differs (the RTE run alone at 10 epochs sat on the paper's row)."""
    from analysis.records import load_records
    from analysis.tables import build_table

    def at(task, lr, epochs):
        return _glue_at(task, lr, epochs, model="roberta-large")

    for task, (lr, epochs) in TAB6.items():
        if task != "rte":
            _copy_records(tree, tmp_path / task, "glue", at(task, lr, epochs))
    _copy_records(tree, tmp_path / "stray", "glue", at("cola", 1e-4, 10), seed=0)
    _copy_records(tree, tmp_path / "rte10", "glue", at("rte", 2e-4, 10))
    rows = build_table(load_records(tmp_path, quiet=True), "2").rows
    (paper,) = [r for r in rows if r.paper and r.method.startswith("LoRA")]
    assert {t for t, s in paper.cells.items() if s} == set(TAB6) - {"rte"} and paper.cells["cola"].n == 2
    ours = {r.label: r for r in rows if not r.paper}
    assert {k: {t for t, s in r.cells.items() if s} for k, r in ours.items()} == {
        "lr=0.0001": {"cola"},
        "epochs=10": {"rte"},
    }


def test_the_per_task_reference_is_what_the_tuned_configs_train_with():
    """``reference_per_task`` (Tab. 6 / Tab. 7) holds the values conf/tuned/<family>/<task>.yaml sets:
    a run made with the shipped config sits on the paper's row."""
    import yaml
    from helpers import CONF

    from analysis.tables import load_paper

    tables = load_paper()["tables"]
    for table, family in (("2", "glue"), ("3", "vision")):
        per_task = tables[table]["reference_per_task"]
        assert set(per_task) == {c["key"] for c in tables[table]["columns"]}
        for task, ref in per_task.items():
            with open(os.path.join(CONF, "tuned", family, f"{task}.yaml")) as f:
                trainer = yaml.safe_load(f)["trainer"]
            assert {k: float(trainer[k.removeprefix("trainer.")]) for k in ref} == ref, (table, task)


def test_empty_tree_prints_a_message_and_the_paper_numbers(tmp_path, capsys):
    from analysis.tables import main

    assert main(["--root", str(tmp_path / "nothing"), "--table", "1", "4"]) == 0
    out, err = capsys.readouterr()
    assert "no usable results.json records" in err and "paper's numbers only" in err
    assert "| LLaMA2-7B | PiLoRA | — / 0.63 | — / 71.5 |" in out
    assert "| ChatGPT † | — | — / — | — / 73.1 |" in out
    assert "| LLaMA2-7B | Top-half | — / 0.66 | — / 72.4 | — / 84.1 |" in out
    assert main(["--root", str(tmp_path), "--table", "3", "--latex"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}" in tex and "--- / 55.38" in tex and r"LoRA$^\dagger$" in tex


def test_paper_numbers_are_consistent():
    from analysis.tables import load_paper

    paper = load_paper()
    text = None
    src = "/work/shared/paper/pilora-paper.txt"
    if os.path.exists(src):
        text = open(src).read()
    for tid, t in paper["tables"].items():
        d = t["decimals"]
        keys = [c["key"] for c in t["columns"]]
        for row in t["rows"]:
            vals = [row["values"][k] for k in keys]
            if "note" in row:  # one printed average disagrees with its row; kept as printed, flagged
                assert f"{row['avg']:.{d}f}" in row["note"] and f"{statistics.mean(vals):.{d}f}" in row["note"]
            else:
                assert abs(statistics.mean(vals) - row["avg"]) <= 0.5 * 10**-d + 1e-9, (tid, row["method"])
            assert row["dagger"] == (row["reported_in"] != "this paper")
            if text:  # every row appears in the paper exactly as stored
                cells = [f"{v:.{d}f}" for v in vals + [row["avg"]]]
                assert "\t".join(cells) in text, (tid, row["method"])
    assert [r["method"] for r in paper["tables"]["4"]["rows"]] == ["Random", "Top-half", "Ours"]
    assert len(paper["tables"]["1"]["rows"]) == 12 and paper["tables"]["2"]["rows"][-1]["params_pct"] == 3.26


# ----------------------------------------------------------------------------- figures


def test_figures_write_png_and_pdf_with_the_records_values(tree, tmp_path):
    from analysis.figures import fig_group_size, fig_rank, fig_rprime, make_all
    from analysis.records import load_records

    df = load_records(tree, quiet=True)
    written, skipped = make_all(df, str(tmp_path / "figs"))
    assert not skipped, skipped
    names = {os.path.basename(p) for p in written}
    for stem in ("fig3_partition_patterns", "fig4_rprime", "fig5_rank", "fig6_group_size"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert any(n.startswith("fig2_gradients_tiny-clip") and n.endswith(".pdf") for n in names)
    assert any(n.startswith("fig7_gradients_layers_tiny-clip") and n.endswith(".png") for n in names)
    assert not any(n.startswith("fig8") for n in names)
    # Fig. 8 is Fig. 7 for LLaMA3-8B: statistics made on that model are drawn under its number
    from pilora import ImportanceStats

    stats = ImportanceStats.load(next(iter(df["importance_file"].dropna())))
    stats.meta["model"] = "llama3-8b"
    stats.save(tmp_path / "llama3" / "importance.pt")
    more, _ = make_all(
        df, str(tmp_path / "figs8"), stats_files=[str(tmp_path / "llama3" / "importance.pt")], only=["8"]
    )
    assert {os.path.basename(p) for p in more} == {
        "fig8_gradients_layers_llama3.png",
        "fig8_gradients_layers_llama3.pdf",
    }
    for p in written:
        assert os.path.getsize(p) > 1000
        with open(p, "rb") as f:
            assert f.read(4) in (b"\x89PNG", b"%PDF")

    def acc(r):
        return 100 * r["metrics"]["test"]["test_accuracy"]

    main = [acc(r) for r in _pick(tree, "vision", task="eurosat", method="pilora")]
    expected = {
        fig_rprime: ([0, 1], [acc(_pick(tree, "fig4_rprime", supplementary_r=0)[0]), statistics.mean(main)]),
        fig_rank: ([4, 8], [acc(_pick(tree, "fig5_rank")[0]), statistics.mean(main)]),
        fig_group_size: (
            [0.5, 0.9],
            [
                acc(r)
                for r in sorted(
                    _pick(tree, "fig6_group"), key=lambda r: r["config"]["method"]["partition"]["args"]["threshold"]
                )
            ],
        ),
    }
    for fn, (xs, ys) in expected.items():
        fig = fn(df)
        (container,) = fig.axes[0].containers  # one line: eurosat, the other configs have one point
        line = container.lines[0]
        assert list(line.get_xdata()) == pytest.approx(xs) and list(line.get_ydata()) == pytest.approx(ys)


def test_partition_pattern_rows_are_the_records_masks(tree):
    from analysis.figures import partition_patterns
    from analysis.records import load_records
    from pilora import ImportanceStats, partition

    fig = partition_patterns(load_records(tree, quiet=True))
    img = fig.axes[0].images[0].get_array()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [l.split()[0] for l in labels] == ["dtd", "eurosat"]
    for i, (sweep, sub) in enumerate((("vision_dtd", "method=pilora"), ("vision", "method=pilora,seed=0"))):
        stats = ImportanceStats.load(os.path.join(tree, "multirun", sweep, sub, "importance.pt"))
        name = next(n for n in stats.modules if ".layers.1." in n and n.endswith("q_proj"))  # last layer (of 2),
        assert name in fig.axes[0].get_title()  # first of the config's target_modules (q_proj, k_proj, ...)
        mask = partition(stats, "hit_frequency", tau=0.5)[name].numpy()
        assert np.array_equal(np.asarray(img[i]).astype(bool), mask)
    assert img.shape[0] == 2 and not np.asarray(img).all()  # both groups present


def test_gradient_heatmap_shows_the_snapshot(tree):
    from analysis.figures import gradient_heatmaps
    from pilora import ImportanceStats

    path = os.path.join(tree, "multirun", "vision", "method=pilora,seed=0", "importance.pt")
    stats = ImportanceStats.load(path)
    fig = gradient_heatmaps(path, layers=[0], targets=["fc1"])
    (ax,) = [a for a in fig.axes if a.images]
    s = next(v for k, v in stats.modules.items() if ".layers.0." in k and k.endswith("fc1"))
    np.testing.assert_allclose(ax.images[0].get_array(), s.grad_snapshot.numpy() / s.checks, rtol=1e-6)
    assert len(gradient_heatmaps(path, "spread").axes) > len(fig.axes)


def test_missing_inputs_give_a_message_not_a_traceback(tmp_path, capsys):
    from analysis.figures import fig_group_size, fig_rank, fig_rprime, gradient_heatmaps, main, partition_patterns, save
    from analysis.records import load_records

    empty = load_records(tmp_path, quiet=True)
    for fig in (
        fig_rprime(empty),
        fig_rank(empty),
        fig_group_size(empty),
        partition_patterns(empty),
        gradient_heatmaps(str(tmp_path / "none.pt")),
    ):
        assert fig.missing_input and save(fig, str(tmp_path / "out"), "x") == []
    err = capsys.readouterr().err
    assert "no importance statistics file" in err and "no records" in err and "Traceback" not in err
    assert main(["--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "no figure written" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")


def test_a_sweep_without_a_partner_point_is_reported(tree):
    from analysis.figures import fig_rprime
    from analysis.records import load_records

    df = load_records(tree, quiet=True)
    alone = df[~df["path"].str.contains("fig4_rprime")]  # r' = 1 only: no sweep over r'
    assert "no sweep over r'" in fig_rprime(alone).missing_input


def test_fig5_point_at_the_main_rank_with_stage1_r_written_out_counts_each_seed_once(tree, tmp_path, capsys):
    """A Fig. 5 point at the main run's rank r = 8, its stage-1 rank written out (method.stage1_r=8,
    fig5_rank's way) and seed 0's stage 1 reused, is the main run's seed 0 again: one duplicate
    dropped, and the r = 8 point is the two main seeds (n=2), not seed 0 twice (n=3)."""
    from analysis.figures import fig_rank
    from analysis.records import load_records
    from pilora.runner.train import train

    stage1 = os.path.join(tree, "multirun", "vision", "method=pilora,seed=0", "importance.pt")
    point = tmp_path / "fig5_rank" / "method.r=8"
    reuse = [f"method.importance_from='{stage1}'", "method.stage1_r=8"]
    train(compose_cfg(QUICK + _vision(str(tree.parent / "img"), "eurosat") + PILORA + reuse, point))
    df = load_records([str(tree), str(tmp_path)])
    fig = fig_rank(df)
    (container,) = fig.axes[0].containers
    main = [100 * r["metrics"]["test"]["test_accuracy"] for r in _pick(tree, "vision", task="eurosat", method="pilora")]
    assert list(container.lines[0].get_xdata()) == [4, 8]
    assert [t.get_text() for t in fig.axes[0].texts] == ["n=2"]
    assert container.lines[0].get_ydata()[1] == pytest.approx(statistics.mean(main))
    assert f"ignoring {point / 'results.json'}: same configuration and seed as" in capsys.readouterr().err


def test_a_point_scored_on_some_test_sets_is_not_drawn_as_their_average(tree, tmp_path, capsys):
    """Fig. 4 over r' = 0, 1, 2 on Commonsense170K, the r' = 1 run scored with task.eval_only=[boolq]:
    its average is BoolQ's alone, not the eight sets' (Table 1 shows no Avg. without all eight), so
    it is left out with a warning naming it and the line runs through r' = 0 and 2."""
    from analysis.figures import fig_rprime
    from analysis.records import load_records

    paths = {
        rs: _copy_records(
            tree, tmp_path / f"rs{rs}", "vision", _commonsense(sets, supplementary_r=rs), method="pilora", seed=0
        )[0]
        for rs, sets in ((0, COMMONSENSE_SETS), (1, ["boolq"]), (2, COMMONSENSE_SETS))
    }
    fig = fig_rprime(load_records(tmp_path, quiet=True))
    err = capsys.readouterr().err
    (container,) = fig.axes[0].containers
    assert list(container.lines[0].get_xdata()) == [0, 2]
    assert f"leaving out {paths[1]}: its score averages 1 of commonsense170k's 8 test sets" in err
    assert paths[0] not in err and paths[2] not in err


# ----------------------------------------------------------------------------- notebooks


def _kernel_name():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
        return "python3"
    except NoSuchKernel:  # register this interpreter's kernel for the user, once
        import subprocess

        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"],
            check=True,
            capture_output=True,
        )
        return "python3"


@pytest.mark.slow
def test_notebooks_execute_top_to_bottom(tree, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PILORA_RESULTS", str(tree))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    kernel = _kernel_name()
    nbdir = os.path.join(REPO, "notebooks")
    names = sorted(os.listdir(nbdir))
    assert {"gradient_heatmaps.ipynb", "partition_patterns.ipynb", "ablations.ipynb", "tables.ipynb"} <= set(names)
    books = {
        name: nbformat.read(os.path.join(nbdir, name), as_version=4)
        for name in ("gradient_heatmaps.ipynb", "partition_patterns.ipynb", "ablations.ipynb", "tables.ipynb")
    }

    async def run_all():  # four kernels at once: their start-up and imports overlap
        await asyncio.gather(
            *(
                NotebookClient(
                    nb, timeout=180, kernel_name=kernel, resources={"metadata": {"path": nbdir}}
                ).async_execute()
                for nb in books.values()
            )
        )

    asyncio.run(run_all())
    for name, nb in books.items():
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"]
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
        if name == "tables.ipynb":
            assert "tiny-clip" in text and "55.38" in text and "(n=2)" in text
        elif name == "ablations.ipynb":
            assert len(images) == 3
        elif name == "gradient_heatmaps.ipynb":
            assert len(images) == 2
        else:
            assert len(images) == 1


def test_fig4_legend_names_pilora_and_the_params_line_and_keeps_n_labels_inside(tree):
    import matplotlib.pyplot as plt

    from analysis.figures import fig_rprime
    from analysis.records import load_records

    plt.switch_backend("Agg")
    fig = fig_rprime(load_records(tree, quiet=True))
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.endswith("PiLoRA") for t in texts) and any(t.startswith("# Params (%)") for t in texts)
    fig.canvas.draw()
    box = ax.get_window_extent()
    for t in ax.texts:
        if t.get_text().startswith("n=") and t.get_visible():
            e = t.get_window_extent()
            assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1
    plt.close(fig)


def test_fig6_legend_names_each_accuracy_line_and_its_params_line(tree):
    """Fig. 6 draws accuracy (left axis) and the trainable share (dashed, right axis) per line; the
    one legend holds both, with the params line in its accuracy line's colour and the records' shares."""
    from analysis.figures import fig_group_size
    from analysis.records import load_records

    fig = fig_group_size(load_records(tree, quiet=True))
    ax, ax2 = fig.axes[0], fig.axes[1]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    accuracy = [c.get_label() for c in ax.containers]
    params = [l.get_label() for l in ax2.get_lines()]
    assert accuracy and texts == accuracy + params
    assert params == [f"# Params (%) {a}" for a in accuracy if "budget-matched" not in a]
    (p,) = ax2.get_lines()
    assert p.get_color() == ax.containers[0].lines[0].get_color() and p.get_linestyle() == "--"
    recs = sorted(_pick(tree, "fig6_group"), key=lambda r: r["config"]["method"]["partition"]["args"]["threshold"])
    assert list(p.get_ydata()) == pytest.approx([100 * r["params"]["adapter_share"] for r in recs])
    assert "# Params" in ax2.get_ylabel()


def _covered(fig, ax, lines):
    """Points of ``lines`` (sampled along each segment, in display coordinates) under the legend."""
    import numpy as np

    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    hits = []
    for line in lines:
        xy = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
            for t in np.linspace(0, 1, 50):
                x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1:
                    hits.append((line.get_label(), x, y))
    return hits


@pytest.mark.parametrize("which", ["fig4", "fig6"])
def test_fig4_and_fig6_legends_cover_no_line(tree, which):
    """The legend sits where no accuracy line and no dashed # Params line runs (``loc="best"`` of
    the accuracy axes alone ignores the twin axes' dashed line and could sit on it)."""
    import matplotlib.pyplot as plt

    from analysis.figures import fig_group_size, fig_rprime
    from analysis.records import load_records

    plt.switch_backend("Agg")
    fig = (fig_rprime if which == "fig4" else fig_group_size)(load_records(tree, quiet=True))
    ax, ax2 = fig.axes[0], fig.axes[1]
    dashed = [line for line in ax2.get_lines() if line.get_linestyle() == "--"]
    accuracy = [c.lines[0] for c in ax.containers]
    assert dashed and accuracy
    assert _covered(fig, ax, dashed + accuracy) == []
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [line.get_label() for line in dashed] == [t for t in labels if t.startswith("# Params")]
    plt.close(fig)


def test_fig3_takes_the_stage_1_of_the_tables_setting_not_a_sweep_beside_it(tmp_path):
    """Two seed-0 RTE statistics: Table 2's r = 8 and table2_glue_r32's r = 32 (whose path sorts
    first). Fig. 3 shows the partition of the paper's setting (paper_numbers.json's reference)."""
    import pandas as pd

    from analysis.figures import pick_pilora_records

    rows = []
    for r, path in ((32, "multirun/table2_glue_r32/a"), (8, "outputs/b")):
        stats = tmp_path / f"r{r}.pt"
        stats.write_bytes(b"")
        config = {"method.r": r, "method.supplementary_r": 1, "method.partition.name": "hit_frequency"}
        rows.append(
            dict(method="pilora", partition="hit_frequency", model="roberta-large", task="rte", seed=0, path=path)
            | dict(importance_from=None, importance_file=str(stats), dir=None, config=config)
        )
    picked = pick_pilora_records(pd.DataFrame(rows))
    assert picked["importance_file"].tolist() == [str(tmp_path / "r8.pt")]


def test_a_rescoring_by_the_evaluate_command_does_not_replace_the_runs_record(tmp_path, capsys):
    """`python -m pilora.runner.evaluate RUN` writes RUN/eval/<overrides>/results.json with the
    run's configuration and seed; the tables keep reading the run's own record."""
    from helpers import write_images

    from analysis.records import load_records
    from pilora.runner import evaluate as ev
    from pilora.runner.train import train

    run = tmp_path / "multirun" / "vision" / "method=lora"
    own = train(compose_cfg(FAST + write_images(str(tmp_path / "img")) + ["trainer.max_steps=2"], run))
    rescored = ev.evaluate(str(run))
    assert rescored["source"] == str(run) and rescored["metrics"]["test"]["test_accuracy"] is not None
    df = load_records(str(tmp_path / "multirun"))
    assert df["path"].tolist() == [str(run / "results.json")]
    assert df["test_accuracy"].tolist() == [own["metrics"]["test"]["test_accuracy"]]
    assert "1 re-scoring record(s) of python -m pilora.runner.evaluate left out" in capsys.readouterr().err
