"""What a user sees: stage-named progress bars, metrics in run.log, a summary after every multirun."""

import logging

import pytest
from helpers import CONF, FAST, compose_cfg, write_images
from hydra import compose, initialize_config_dir
from transformers import TrainerState


def test_progress_bars_name_their_stage():
    from pilora.runner.console import StageProgress, stage_label

    assert [stage_label(f"/x/{d}") for d in ("stage1", "stage2", "train")] == [
        "stage 1 (importance)",
        "stage 2",
        "train",
    ]
    bar = StageProgress("stage 1 (importance)")
    state = TrainerState(is_world_process_zero=True, max_steps=5)
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
    # a sweep over tasks of different headlines (GLUE accuracy, commonsense avg_accuracy): each row
    # names its own, the columns stay aligned
    rows[1] = {**{k: v for k, v in rows[1].items() if k != "accuracy"}, "avg_accuracy": 0.25}
    mixed = format_table(rows).splitlines()
    assert " score " in mixed[0] and len({len(line) for line in mixed}) == 1
    assert "0.5000 accuracy" in mixed[2] and "0.2500 avg_accuracy" in mixed[3]


def test_summary_rows_show_the_swept_values_and_the_folder(tmp_path):
    """Six r' x seed records: every row names its r' and its folder, so no two rows read alike."""
    import json

    from pilora.runner.summary import format_table, summary_rows, swept_keys

    swept = swept_keys(["method=pilora", "method.supplementary_r=0,2,8", "seed=0,1", "trainer.max_steps=3"])
    assert swept == ["method.supplementary_r", "seed"]
    for r in (0, 2, 8):
        for seed in (0, 1):
            folder = tmp_path / f"method.supplementary_r={r},method=pilora,seed={seed}"
            folder.mkdir()
            record = {
                "schema": 1,
                "status": "complete",
                "method": "pilora",
                "task": "sst2",
                "seed": seed,
                "metric": "accuracy",
                "metrics": {"final": {"eval_accuracy": 0.5}, "test": {}},
                "params": {"trainable": 10, "adapter": 8, "share": 0.01},
                "pilora": {"dominant_fraction": 0.4},
                "timing": {"total_s": 1.0},
                "config": {"method": {"name": "pilora", "supplementary_r": r}, "seed": seed},
            }
            (folder / "results.json").write_text(json.dumps(record))
    lines = format_table(summary_rows(str(tmp_path), swept)).splitlines()
    rows = lines[2:]
    assert len(rows) == 6 and len(set(rows)) == 6 and len({len(line) for line in lines}) == 1
    for row in rows:
        cells = row.split()
        r, folder = cells[3], cells[-1]
        assert (
            r.startswith("supplementary_r=") and f"{r.replace('supplementary_r', 'method.supplementary_r')}," in folder
        )
        assert f"seed={cells[2]}" in folder and (tmp_path / folder / "results.json").is_file()
    # an unswept multirun keeps the old columns, plus the folder
    assert "point" not in format_table(summary_rows(str(tmp_path))).splitlines()[0]


@pytest.mark.slow
def test_peft_future_warning_is_not_repeated_per_model(tmp_path):
    """Two PiLoRA jobs on a tiny RoBERTa wrap four models in PEFT; transformers' deprecation
    warning that PEFT triggers for each is not printed (it was, once per model)."""
    import os
    import subprocess
    import sys

    from helpers import glue_overrides

    overrides = (
        FAST
        + glue_overrides(str(tmp_path / "data"))
        + [
            "model=tiny-roberta",
            "trainer.max_steps=2",
            "trainer.save_strategy=no",
            "save_adapter=false",
            "method=pilora",
            "method.stage1.max_steps=2",
            "method.importance_interval=1",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "seed=0,1",
        ]
    )
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *overrides], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("PiLoRA stage 2: training") + proc.stderr.count("PiLoRA stage 2: training") == 2
    assert "is_gradient_checkpointing" not in proc.stdout + proc.stderr


def test_each_metric_line_is_printed_once(capsys):
    """The progress bar no longer writes Trainer's metric dict: MetricsToLog's log line is the only copy."""
    from pilora.runner.console import StageProgress

    bar = StageProgress("train")
    state = TrainerState(is_world_process_zero=True, max_steps=5, global_step=1)
    bar.on_train_begin(None, state, None)
    try:
        bar.on_log(None, state, None, logs={"loss": 1.25, "grad_norm": 0.5})
    finally:
        bar.training_bar.close()
    captured = capsys.readouterr()
    assert "1.25" not in captured.out + captured.err


def test_no_printer_callback_beside_the_metric_log(tmp_path):
    """With disable_tqdm Trainer adds PrinterCallback, which prints each log dict: the runner drops it."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from pilora.runner.console import MetricsToLog
    from pilora.runner.trainer_args import make_trainer

    class _Task:
        remove_unused_columns, accepts_loss_kwargs = True, None

        def collator(self):
            return None

        def compute_metrics(self, p):
            return {}

    import torch

    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path / "train"), disable_tqdm=True, report_to="none")
    trainer = make_trainer({}, _Task(), model, {"train": [], "validation": None}, args, evaluate=False)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert PrinterCallback not in kinds and MetricsToLog in kinds
