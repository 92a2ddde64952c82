"""Tiny data files and config composition shared by the runner tests (nothing is downloaded)."""

import csv
import json
import os
import random

from hydra import compose, initialize_config_dir

import hydra_setup  # noqa: F401 (the method schema and the resolvers of conf/)

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

FAST = [
    "logger=none",
    "trainer.logging_steps=1",
    "trainer.warmup_steps=0",
    "trainer.save_strategy=epoch",
    "trainer.per_device_eval_batch_size=16",
    "trainer.disable_tqdm=true",
    "trainer.bf16=false",  # this machine has no GPU; the tuned GLUE / vision settings train in bf16
]

# For tests that compare two runs of one job across processes (sharded vs one process, killed and
# resumed). Adam divides each gradient entry by its own size, so an entry near 0 (B = 0 at step 1,
# then cancellations) moves by up to lr whatever its rounding: with the default eps 1e-8 a
# reduction-order difference of ~1e-12 became a 2.8e-4 difference in one FSDP-trained weight
# (measured). eps = 1e-6 bounds that gain at lr / eps and still moves the weights by ~lr.
ROUNDING_STABLE_ADAM = "+trainer.adam_epsilon=1e-6"


def compose_cfg(overrides, output_dir=None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
    return cfg


def write_sst2(d, n_train=96, n_val=32, seed=0):
    """Sentences whose label is a keyword: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    os.makedirs(d, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(os.path.join(d, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            for _ in range(n):
                label = rng.randrange(2)
                filler = " ".join(rng.choice(words) for _ in range(4))
                w.writerow([f"{filler} {'good' if label else 'bad'} {filler}", label])
    return {f"task.dataset.data_files.{s}": os.path.join(d, f"{s}.csv") for s in ("train", "validation")}


def glue_overrides(d, **kw):
    files = write_sst2(d, **kw)
    return [
        "task=glue/sst2",
        "task.dataset.path=csv",
        "task.dataset.name=null",
        "model=minilm-l6",
        "trainer.learning_rate=2e-3",
        "trainer.per_device_train_batch_size=16",
        "trainer.bf16=false",  # tuned/glue trains in bf16 (GOAT), which needs a GPU
    ] + [f"+{k}={v}" for k, v in files.items()]


def write_commonsense(d, n_train=60, n_test=8, seed=0):
    rng = random.Random(seed)
    os.makedirs(os.path.join(d, "ft-training_set"), exist_ok=True)
    rows = []
    for _ in range(n_train):
        a = rng.choice(["true", "false"])
        rows.append(
            {
                "instruction": f"Please answer: is it {a}? Answer format: true/false",
                "input": "",
                "output": f"the correct answer is {a}",
                "answer": a,
            }
        )
    json.dump(rows, open(os.path.join(d, "ft-training_set", "commonsense_170k.json"), "w"))
    for name in ("boolq", "piqa"):
        os.makedirs(os.path.join(d, "dataset", name), exist_ok=True)
        json.dump(rows[:n_test], open(os.path.join(d, "dataset", name, "test.json"), "w"))
    return [
        "task=commonsense/commonsense170k",
        "model=tiny-llama",
        f"task.dataset.root={d}",
        "task.val_set_size=8",
        "task.cutoff_len=48",
        "trainer.bf16=false",
        "trainer.fp16=false",
        "task.generation.max_new_tokens=8",
        "trainer.learning_rate=5e-3",
        "trainer.per_device_train_batch_size=8",
        "trainer.eval_strategy=epoch",
        "~task.eval_sets.social_i_qa",
        "~task.eval_sets.hellaswag",
        "~task.eval_sets.winogrande",
        "~task.eval_sets.ARC-Easy",
        "~task.eval_sets.ARC-Challenge",
        "~task.eval_sets.openbookqa",
    ]


def write_images(d, n=24, seed=0):
    from PIL import Image

    rng = random.Random(seed)
    for split, count in (("train", n), ("test", 8)):
        for label, colour in ((0, (220, 30, 30)), (1, (30, 30, 220))):
            os.makedirs(os.path.join(d, split, str(label)), exist_ok=True)
            for i in range(count // 2):
                jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
                Image.new("RGB", (40, 40), jitter).save(os.path.join(d, split, str(label), f"{i}.png"))
    return vision_overrides(d)


def vision_overrides(d, task="eurosat"):
    """A vision task on the image folder ``d`` (``train/<label>/``, ``test/<label>/``) with the tiny CLIP."""
    return [
        f"task=vision/{task}",
        "model=tiny-clip",
        "task.dataset.path=imagefolder",
        "task.dataset.name=null",
        f"task.dataset.data_dir={d}",
        "task.num_labels=2",
        "task.holdout_fraction=0.25",
        "trainer.learning_rate=5e-3",
        "trainer.per_device_train_batch_size=6",
        "trainer.bf16=false",  # tuned/vision trains in bf16 (GOAT), which needs a GPU
    ]


def table_rows(text, model, method_prefix):
    """Cells of the Markdown table rows of ``model`` whose method starts with ``method_prefix``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) > 3 and cells[0] == model and cells[1].startswith(method_prefix):
            rows.append(cells)
    return rows


def interrupt_during_training(out):
    """Make the finished job folder ``out`` look killed during training: no record, and no
    training.json (written only once training is over; with it a rerun only evaluates)."""
    for name in ("results.json", "training.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
