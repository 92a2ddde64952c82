"""Multi-process (DDP) training on CPU with gloo: a 2-process ``torchrun`` job must partition and
train exactly like one process with the same global batch.

Tolerances (measured on CPU, see README "Scale-out"): the importance statistics go through
DDP's fp32 all-reduce (a different summation order than one process's batch mean), so the
stage-1 ``ΣS`` agree to ~1e-6 relative (element-wise, worst row) and the hit counts ``H`` —
hence the masks — exactly; after 3 + 3 optimizer steps the train / eval / test losses agree to
~1e-7 relative. The test allows 1e-4 (and demands identical masks). Exactness needs ``method.dropout=0`` (every rank draws the same LoRA-dropout masks,
one process draws different ones for its second half-batch) and an eval batch size that splits
the eval sets evenly over the ranks (else the eval loss averages a duplicated batch).
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import FAST, compose_cfg, write_commonsense, write_images
from safetensors.torch import load_file

from pilora import ImportanceStats
from pilora.partition import partition
from pilora.runner.train import DistributedMismatch, check_ranks_agree, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = 1e-4


def _common(img):
    return (
        FAST
        + write_images(img)
        + [
            "method=pilora",
            "method.stage1.max_steps=3",
            "method.importance_interval=1",
            "method.dropout=0",
            "trainer.num_train_epochs=1",
            "trainer.per_device_eval_batch_size=1",
            "trainer.save_strategy=no",
            "+trainer.ddp_find_unused_parameters=false",
        ]
    )


def _masks(out):
    stats = ImportanceStats.load(os.path.join(out, "importance.pt"))
    return stats, partition(stats)


def _torchrun(overrides, out, nproc=2):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        "run.py",
        *overrides,
        f"hydra.run.dir={out}",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _ddp_record(overrides, out, per_rank: int) -> dict:
    """The record of a 2-rank torchrun job with ``per_rank`` training examples per rank and step."""
    proc = _torchrun(overrides + [f"trainer.per_device_train_batch_size={per_rank}"], out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(out / "results.json"))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    base = _common(str(tmp_path / "img"))
    ddp_out = tmp_path / "ddp"
    ddp = _ddp_record(base, ddp_out, per_rank=3)
    assert ddp["world_size"] == 2 and ddp["steps"] == 3  # 18 train images / (2 ranks x 3)
    # the ranks compared their masks (all_gather of hashes) and only rank 0 wrote the outputs
    rank0_log, rank1_log = (ddp_out / "run.log").read_text(), (ddp_out / "run.rank1.log").read_text()
    assert "stage-1 partitions agree across 2 ranks" in rank0_log and "agree across 2 ranks" in rank1_log
    assert "record written" in rank0_log and "record written" not in rank1_log

    # one process, same global batch: 6 per step, or 3 per step with 2-step gradient accumulation
    single = train(compose_cfg(base + ["trainer.per_device_train_batch_size=6"], tmp_path / "one"))
    accum = train(
        compose_cfg(
            base + ["trainer.per_device_train_batch_size=3", "trainer.gradient_accumulation_steps=2"],
            tmp_path / "accum",
        )
    )
    ddp_stats, ddp_masks = _masks(ddp_out)
    for out, rec in ((tmp_path / "one", single), (tmp_path / "accum", accum)):
        stats, masks = _masks(out)
        assert rec["world_size"] == 1 and rec["steps"] == ddp["steps"]
        assert masks.keys() == ddp_masks.keys()
        for name in masks:
            assert torch.equal(masks[name], ddp_masks[name]), name
            assert torch.equal(stats.modules[name].hits, ddp_stats.modules[name].hits), name
            torch.testing.assert_close(
                stats.modules[name].score_sum, ddp_stats.modules[name].score_sum, rtol=REL, atol=0
            )
        assert rec["pilora"]["dominant_fraction_per_module"] == ddp["pilora"]["dominant_fraction_per_module"]
        assert rec["train_loss"] == pytest.approx(ddp["train_loss"], rel=REL)
        for part in ("final", "test"):
            for key, value in ddp["metrics"][part].items():
                if key.endswith(("loss", "accuracy")):
                    assert rec["metrics"][part][key] == pytest.approx(value, rel=REL), (part, key)


def _mismatch_worker(rank, world, init_file, q):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        masks = {
            "layer.q_proj": torch.tensor([True, False, rank == 1]),
            "layer.k_proj": torch.ones(2, dtype=torch.bool),
        }
        check_ranks_agree(masks)
        q.put((rank, "no error"))
    except DistributedMismatch as err:
        q.put((rank, str(err)))
    finally:
        torch.distributed.destroy_process_group()


def test_rank_mismatch_is_reported(tmp_path):
    ctx = torch.multiprocessing.get_context("fork")  # the children reuse the imported modules
    q = ctx.Queue()
    procs = [ctx.Process(target=_mismatch_worker, args=(r, 2, str(tmp_path / "pg"), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        assert "masks differ between rank 0 and rank 1" in results[rank] and "layer.q_proj" in results[rank]
        assert "layer.k_proj" not in results[rank]


def test_fsdp_is_refused_for_stage1(tmp_path):
    out = tmp_path / "o"
    cfg = compose_cfg(FAST + write_images(str(tmp_path / "img")) + ["method=pilora", "+trainer.fsdp=true"], out)
    with pytest.raises(ValueError, match=r"stage 1 needs full \(unsharded\) LoRA gradients.*importance_from"):
        train(cfg)
    assert not os.path.exists(out / "results.json")


@pytest.mark.slow
def test_lora_dash_two_process_ddp_picks_the_same_directions_as_one_process(tmp_path):
    """LoRA-Dash's launch under DDP: every rank takes the SVD of the same W and the same all-reduced
    LoRA update, so the ranks agree (checked in the job) and pick the directions one process picks."""
    base = (
        FAST
        + write_images(str(tmp_path / "img"))
        + [
            "method=lora_dash",
            "method.prelaunch_steps=2",
            "method.directions=2",
            "method.dropout=0",
            "trainer.num_train_epochs=2",
            "trainer.per_device_eval_batch_size=1",
            "trainer.save_strategy=no",
            "+trainer.ddp_find_unused_parameters=false",
        ]
    )
    ddp_out = tmp_path / "ddp"
    ddp = _ddp_record(base, ddp_out, per_rank=3)
    one = train(compose_cfg(base + ["trainer.per_device_train_batch_size=6"], tmp_path / "one"))
    assert ddp["world_size"] == 2 and ddp["steps"] == one["steps"] == 6
    assert ddp["lora_dash"]["launch_step"] == one["lora_dash"]["launch_step"]
    assert ddp["lora_dash"]["directions"] == one["lora_dash"]["directions"]
    assert ddp["metrics"]["final"]["eval_loss"] == pytest.approx(one["metrics"]["final"]["eval_loss"], rel=REL)


def _vary_lengths(root, seed=1):
    """write_commonsense's prompts all tokenize to the same length: repeat a phrase 0-5 times so the
    ranks' batches hold different numbers of label tokens (206 vs 218 in the first step)."""
    rng = random.Random(seed)
    path = os.path.join(root, "ft-training_set", "commonsense_170k.json")
    rows = json.load(open(path))
    for row in rows:
        row["instruction"] = row["instruction"].replace("answer:", "answer:" + " is it" * rng.randrange(6))
    json.dump(rows, open(path, "w"))


@pytest.mark.slow
def test_causal_lm_two_process_ddp_trains_the_same_adapter_as_one_process(tmp_path):
    """Causal-LM loss under DDP: Trainer all-reduces the label-token count of the global batch
    (``average_tokens_across_devices``) and scales each rank's token sum by world size / that count,
    so the gradients and the logged loss are the global batch's token mean, as in one process.
    Measured: train losses equal to ~1e-7 relative, the adapters bit for bit; with
    ``+trainer.average_tokens_across_devices=false`` (each rank's own token mean) the step-1 loss
    moves by 7e-6 relative, the step-2 loss by 4e-5 and the adapters by 0.015 (max abs).
    ``eval_loss`` differs by ~8e-6 relative: an eval step's loss is the token mean of all ranks'
    batches together, one process averages its batches' token means."""
    data = str(tmp_path / "data")
    base = FAST + write_commonsense(data)
    _vary_lengths(data)
    base += [
        "method=lora",
        "method.dropout=0",
        "task.cutoff_len=256",  # write_commonsense's 48 truncates every example to the same length
        "trainer.max_steps=3",
        "trainer.per_device_eval_batch_size=4",
        "+trainer.ddp_find_unused_parameters=false",
    ]
    ddp_out = tmp_path / "ddp"
    ddp = _ddp_record(base, ddp_out, per_rank=4)
    one = train(compose_cfg(base + ["trainer.per_device_train_batch_size=8"], tmp_path / "one"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["steps"] == one["steps"] == 3
    assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)  # the logged per-step losses
    x = load_file(ddp_out / "adapter" / "adapter_model.safetensors")
    y = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and len(x) == 2 * 5 * 2  # A and B of 5 target modules in 2 layers
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-5, msg=key)
    assert ddp["metrics"]["final"]["eval_loss"] == pytest.approx(one["metrics"]["final"]["eval_loss"], rel=REL)
    assert ddp["metrics"]["test"] == one["metrics"]["test"]
