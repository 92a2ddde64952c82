"""What a user sees: stage-named progress bars, metrics in run.log, a summary after every multirun."""

import logging
import types

from helpers import CONF, FAST, compose_cfg, write_images
from hydra import compose, initialize_config_dir


def test_progress_bars_name_their_stage():
    from pilora.runner.console import StageProgress, stage_label

    assert [stage_label(f"/x/{d}") for d in ("stage1", "stage2", "train")] == [
        "stage 1 (importance)",
        "stage 2",
        "train",
    ]
    bar = StageProgress("stage 1 (importance)")
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=5)
    bar.on_train_begin(None, state, None)
    try:
        assert bar.training_bar.desc.startswith("stage 1 (importance)")
    finally:
        bar.training_bar.close()


def test_run_log_holds_each_stages_metrics(tmp_path, caplog):
    from pilora.runner.train import train

    cfg = compose_cfg(
        FAST
        + write_images(str(tmp_path / "img"))
        + [
            "method=pilora",
            "method.stage1.max_steps=3",
            "method.importance_interval=1",
            "trainer.max_steps=3",
            "trainer.save_strategy=no",
            "save_adapter=false",
        ],
        tmp_path / "out",
    )
    with caplog.at_level(logging.INFO, logger="pilora"):
        rec = train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "pilora"]
    stage1 = [m for m in lines if m.startswith("stage 1 (importance) step")]
    stage2 = [m for m in lines if m.startswith("stage 2 step")]
    assert len([m for m in stage1 if "loss=" in m and "grad_norm=" in m]) == 3
    assert any("eval_accuracy=" in m for m in stage2)
    assert len([m for m in stage2 if ": loss=" in m]) == len(rec["train_loss"]) == 3


def test_every_multirun_ends_with_the_summary_table():
    from pilora.runner.summary import format_table

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=lora"], return_hydra_config=True)
    assert cfg.hydra.callbacks.summary._target_ == "hydra_setup.PrintSummary"
    rows = [
        {
            "method": m,
            "task": "commonsense170k",
            "seed": 0,
            "accuracy": 0.5,
            "trainable": 10,
            "adapter": 8,
            "share_%": 1.0,
            "dominant": None,
            "time_s": 3.0,
            "path": "x",
        }
        for m in ("lora", "lora_matched")
    ]
    table = format_table(rows).splitlines()
    assert len({len(line) for line in table}) == 1  # columns stay aligned with long names
