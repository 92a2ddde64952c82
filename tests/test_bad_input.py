"""Bad input fails early with an error that names the cause, and never leaves a results.json.
(Missing files, GLUE labels out of range, NaN losses and impossible model/task pairs are also
covered in test_configs.py.)"""

import errno
import os
import shutil
import subprocess
import sys

import pytest
from helpers import FAST, compose_cfg, write_commonsense, write_images, write_sst2

from pilora.runner import records
from pilora.runner.records import RecordWriteError
from pilora.runner.train import train
from pilora.tasks import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def _run_py(args, out):
    proc = subprocess.run(
        [sys.executable, "run.py", *args, f"hydra.run.dir={out}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "results.json"))
    return proc.stderr


def _fails(overrides, out, exc, match):
    with pytest.raises(exc, match=match):
        train(compose_cfg(overrides, out))
    assert not os.path.exists(os.path.join(out, "results.json"))


@pytest.fixture
def images(tmp_path):
    return write_images(str(tmp_path / "img"))


@pytest.fixture
def glue(tmp_path):
    """sst2 overrides without data files, and a folder holding good train/validation csv files."""
    d = tmp_path / "csv"
    write_sst2(d, n_train=24, n_val=8)
    return FAST + [
        "task=glue/sst2",
        "task.dataset.path=csv",
        "task.dataset.name=null",
        "model=minilm-l6",
        "trainer.max_steps=2",
    ], d


def _files(d, train="train.csv"):
    return [
        f"+task.dataset.data_files.train={d / train}",
        f"+task.dataset.data_files.validation={d / 'validation.csv'}",
    ]


# --- overrides ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_malformed_override_is_a_hydra_error(tmp_path):
    err = _run_py(["trainer.learning_rate=["], tmp_path / "o")
    assert "no viable alternative at input '['" in err and "override_grammar" in err


@pytest.mark.slow
def test_unknown_trainer_key_is_named_without_plus(tmp_path):
    """`run.py trainer.nonexistent=1`: the TrainingArguments check names it (hydra_setup takes the
    override as `+trainer.nonexistent=1`), not Hydra's "Key 'nonexistent' is not in struct"."""
    err = _run_py(["trainer.nonexistent=1"], tmp_path / "o")
    assert "error: training: trainer.nonexistent is not a transformers.TrainingArguments field" in err
    assert "not in struct" not in err and "Traceback" not in err


@pytest.mark.slow
def test_wrong_type_through_run_py(tmp_path, images):
    err = _run_py(FAST + images + ["trainer.num_train_epochs=abc"], tmp_path / "o")
    assert "trainer.num_train_epochs must be a float, got 'abc'" in err


@pytest.mark.parametrize(
    "override,match",
    [
        ("trainer.max_steps=2.5", r"trainer\.max_steps must be an int, got 2\.5"),
        ("trainer.bf16=maybe", r"trainer\.bf16 must be a bool, got 'maybe'"),
        ("trainer.learning_rate=fast", r"trainer\.learning_rate must be a float, got 'fast'"),
        ("+trainer.nonexistent=1", r"trainer\.nonexistent is not a transformers\.TrainingArguments field"),
        (
            "+trainer.learning_rat=1",
            r"trainer\.learning_rat is not a .*TrainingArguments field \(did you mean trainer\.learning_rate\?\)",
        ),
        ("trainer.lr_scheduler_type=zigzag", r"invalid trainer settings.*zigzag"),
    ],
)
def test_bad_trainer_values(tmp_path, images, override, match):
    _fails(FAST + images + [override], tmp_path / "o", ValueError, match)


def test_numeric_strings_are_accepted(tmp_path, images):
    """YAML 1.1 reads ``1e-3`` as a string; the runner converts strings that are numbers."""
    rec = train(
        compose_cfg(
            FAST + images + ["trainer.learning_rate='5e-3'", "trainer.max_steps='2'", "method.r=2"], tmp_path / "o"
        )
    )
    assert rec["steps"] == 2 and rec["config"]["trainer"]["learning_rate"] == "5e-3"


# --- data -----------------------------------------------------------------------------------------


def test_empty_data_file(tmp_path, glue):
    base, d = glue
    (d / "empty.csv").write_text("")
    _fails(base + _files(d, "empty.csv"), tmp_path / "o", DataError, r"empty\.csv' of task 'sst2' is empty \(0 bytes\)")


def test_truncated_data_file(tmp_path, glue):
    base, d = glue
    text = (d / "train.csv").read_text()
    (d / "cut_quote.csv").write_text(text[:200] + '\n"an unterminated quoted sentence, 1')
    _fails(
        base + _files(d, "cut_quote.csv"),
        tmp_path / "o",
        DataError,
        r"could not read data file '.*cut_quote\.csv' of task 'sst2'.*truncated",
    )
    (d / "cut_row.csv").write_text(text.rstrip("\n").rsplit(",", 1)[0] + ",\n")  # last row lost its label
    _fails(
        base + _files(d, "cut_row.csv"),
        tmp_path / "o2",
        DataError,
        r"split 'train' of task 'sst2' has 1 row\(s\) with no 'label' value .*truncated",
    )


def test_wrong_text_column_names_the_file(tmp_path, glue):
    """Train and validation with different columns: the cast error of ``datasets`` named neither."""
    base, d = glue
    (d / "other.csv").write_text("text,label\nhello good,1\nbye bad,0\n")
    _fails(
        base + _files(d, "other.csv"),
        tmp_path / "o",
        DataError,
        r"data file '.*other\.csv' of task 'sst2': the task needs columns \['sentence'\] but the file has "
        r"\['text', 'label'\]; .*task\.text_columns",
    )


@pytest.mark.parametrize("split", ["train", "validation"])
def test_header_only_csv(tmp_path, glue, split):
    base, d = glue
    (d / "header.csv").write_text("sentence,label\n")
    files = [
        f"+task.dataset.data_files.{s}={d / ('header.csv' if s == split else s + '.csv')}"
        for s in ("train", "validation")
    ]
    _fails(
        base + files,
        tmp_path / "o",
        DataError,
        r"data file '.*header\.csv' of task 'sst2' is empty: it has a header \(sentence, label\) but no rows",
    )


def test_string_labels(tmp_path, glue):
    base, d = glue
    (d / "words.csv").write_text("sentence,label\ngood film,positive\nbad film,negative\n")
    _fails(
        base + _files(d, "words.csv"),
        tmp_path / "o",
        DataError,
        r"column 'label' of split 'train' of task 'sst2' holds str labels \(e\.g\. 'positive'\).*"
        r"integers 0\.\.1",
    )


def test_image_labels_out_of_range(tmp_path, images):
    extra = tmp_path / "img" / "train" / "2"  # a third class folder, but task.num_labels=2
    extra.mkdir()
    shutil.copy(tmp_path / "img" / "train" / "1" / "0.png", extra / "0.png")
    _fails(FAST + images, tmp_path / "o", DataError, r"the data has 3 classes but task\.num_labels is 2")


def test_image_that_fails_to_decode(tmp_path, images):
    bad = tmp_path / "img" / "train" / "1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    _fails(
        FAST + images + ["method=pilora", "method.stage1.max_steps=4"],
        tmp_path / "o",
        DataError,
        r"1 of 25 images of split 'train' do not decode: '.*broken\.png' \(UnidentifiedImageError",
    )
    assert not (tmp_path / "o" / "stage1").exists()  # found before stage 1's first step


# --- models -----------------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path, glue, images):
    base, d = glue
    _fails(
        base + _files(d) + [f"model.path={tmp_path}/no-such-model"],
        tmp_path / "o",
        FileNotFoundError,
        r"model\.path '.*no-such-model' does not exist",
    )
    _fails(
        FAST + images + ["model=clip-vit-b32", f"model.path={tmp_path}/no-clip"],
        tmp_path / "o2",
        FileNotFoundError,
        r"model\.path '.*no-clip' does not exist",
    )


def test_model_path_at_a_data_folder(tmp_path, glue):
    """A folder without config.json is not a checkpoint (transformers said: install sentencepiece)."""
    base, d = glue
    _fails(
        base + _files(d) + [f"model.path={d}"],
        tmp_path / "o",
        FileNotFoundError,
        r"model\.path '.*csv' is not a model checkpoint \(no config\.json\): the folder holds train\.csv, "
        r"validation\.csv\. Set model\.path",
    )


def test_model_path_of_a_tiny_model_is_refused(tmp_path, images):
    """``tiny-*`` models are built from an inline config: a model.path would be silently ignored."""
    out = tmp_path / "o"
    _fails(
        FAST + images + ["trainer.max_steps=1", f"model.path={tmp_path}/ckpt"],
        out,
        ValueError,
        r"model\.path='.*ckpt' is ignored by model 'tiny-clip'.*model\.from_config.*Drop the model\.path",
    )
    assert not out.exists()  # refused before the job folder is made


def test_lora_matched_with_supplementary_rank_above_r(tmp_path, images):
    _fails(
        FAST + images + ["trainer.max_steps=1", "method=lora_matched", "method.r=2", "method.supplementary_r=4"],
        tmp_path / "o",
        ValueError,
        r"method\.supplementary_r=4 exceeds method\.r=2: lora_matched .* 0 <= r' <= r",
    )


def test_tokenizer_without_pad_token_trains(tmp_path):
    """LLaMA tokenizers ship without a pad token: the commonsense path pads with unk (or eos)."""
    from transformers import AutoTokenizer

    from pilora.runner.config import asset_path

    tok = AutoTokenizer.from_pretrained(asset_path("tiny-wordpiece"))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").pad_token is None
    overrides = (
        FAST
        + write_commonsense(str(tmp_path / "cs"), n_train=24, n_test=4)
        + [f"model.tokenizer={tmp_path / 'tok'}", "method.r=2", "trainer.max_steps=2"]
    )
    rec = train(compose_cfg(overrides, tmp_path / "o"))
    assert rec["status"] == "complete" and rec["steps"] == 2
    assert {"test_boolq_accuracy", "test_avg_accuracy"} <= set(rec["metrics"]["test"])  # generation ran


# --- disk -------------------------------------------------------------------------------------------


def test_disk_full_on_record_write(tmp_path, images, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records.os, "fsync", no_space)
    out = tmp_path / "o"
    _fails(
        FAST + images + ["trainer.max_steps=2", "method.r=2"],
        out,
        RecordWriteError,
        # training.json (the record of training, written before the final evaluation) is the first
        r"could not write the record '.*training\.json': No space left on device.*no record was written.*"
        r"Free some disk space",
    )
    assert not [f for f in os.listdir(out) if f.endswith(".json") and f != "job.json"]  # no temp file either


# --- target modules and the task's head -------------------------------------------------------------


def _tiny_classifier(model_type):
    """A randomly initialised sequence classifier: BERT's head is one linear (``classifier``),
    RoBERTa's a module holding ``classifier.dense`` and ``classifier.out_proj``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        model_type,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=40,
    )
    return AutoModelForSequenceClassification.from_config(config)


HEAD = r"target modules {} are in the task's head \['classifier'\] \({}\): the head trains in full"


@pytest.mark.parametrize(
    "model_type, targets, heads, match",
    [
        ("bert", ["classifier"], "head", HEAD.format(r"\['classifier'\]", "model.head_modules")),
        ("bert", ["query", "classifier"], "head", HEAD.format(r"\['classifier'\]", "model.head_modules")),
        ("bert", "classifier", "head", HEAD.format("classifier", "model.head_modules")),  # a regex
        ("bert", ["classifier"], "listed", HEAD.format(r"\['classifier'\]", r"method\.modules_to_save")),
        ("roberta", ["classifier"], "head", HEAD.format(r"\['classifier'\]", "model.head_modules")),  # no linear
        ("roberta", ["out_proj"], "head", HEAD.format(r"\['out_proj'\]", "model.head_modules")),  # only in the head
        # the layers a message lists and suggests are the backbone's: [classifier,dense] led to the refusal
        ("bert", ["nope"], "head", r"its linear layers are named \['dense', 'key', 'query', 'value'\]$"),
        ("bert", "nope", "head", r"name layers that exist as a list \(method\.target_modules=\[dense,key\]\)"),
        ("bert", ["dense"], "head", None),
        ("roberta", ["dense"], "head", None),  # the backbone's dense layers; PEFT leaves classifier.dense alone
        ("bert", ["classifier"], "none", None),  # nothing trains in full: the classifier may take an adapter
    ],
)
def test_target_modules_in_the_head_are_refused_and_never_suggested(model_type, targets, heads, match):
    """`run.py method.target_modules=[classifier]` failed inside PEFT (NoMatchingPeftModuleError,
    a traceback); the "match no linear layer" message suggested `[classifier,dense]`, which leads there."""
    from pilora.methods.base import HeadModules, check_target_modules

    model = _tiny_classifier(model_type)
    given = {"head": HeadModules(["classifier"]), "listed": ["classifier"], "none": []}[heads]
    if match is None:
        check_target_modules(model, targets, heads=given)
        return
    with pytest.raises(ValueError, match=match) as info:
        check_target_modules(model, targets, heads=given)
    assert "'classifier'" not in str(info.value).split("named ")[-1].split("(of ")[-1]


def test_targeting_the_head_stops_before_anything_trains(tmp_path, images):
    """`run.py method=pilora method.target_modules=[classifier]`: one message (an expected error),
    before stage 1 trains a step."""
    from pilora.runner.errors import expected_message

    out = tmp_path / "o"
    overrides = FAST + images + ["method=pilora", "method.stage1.max_steps=2", "method.target_modules=[classifier]"]
    with pytest.raises(ValueError) as info:
        train(compose_cfg(overrides, out))
    message = expected_message(info.value)
    assert message.startswith(
        "target modules ['classifier'] are in the task's head ['classifier'] (model.head_modules)"
    )
    assert (
        "e.g. method.target_modules=[fc1,fc2] (of ['fc1', 'fc2', 'k_proj', 'out_proj', 'q_proj', 'v_proj'])" in message
    )
    assert not (out / "stage1").exists() and not (out / "results.json").exists()


def test_a_wrong_head_module_names_model_head_modules(tmp_path, images):
    """`run.py model.head_modules=[nope]`: the error blamed method.modules_to_save, which was not set."""
    out = tmp_path / "o"
    _fails(
        FAST + images + ["model.head_modules=[nope]", "trainer.max_steps=1"],
        out,
        ValueError,
        r"^model\.head_modules names \['nope'\], which CLIPImageClassifier does not contain; its modules are named "
        r".*\(set model\.head_modules to the names of the task's head\)$",
    )
    assert not (out / "train").exists()
    _fails(
        FAST + images + ["method.modules_to_save=[nope]", "trainer.max_steps=1"],
        tmp_path / "o2",
        ValueError,
        r"^method\.modules_to_save names \['nope'\].*\(the task's head: method\.modules_to_save=null\)$",
    )


def test_every_model_key_the_code_reads_is_a_model_key():
    """The keys `+model.<key>` may add (pilora.runner.validate.model_keys: those conf/model/*.yaml
    use) hold every key the code reads from a model section, so no real setting is refused."""
    import glob
    import re

    from pilora.runner.validate import model_keys

    read = set()
    for path in glob.glob(os.path.join(ROOT, "pilora", "**", "*.py"), recursive=True):
        with open(path) as f:
            text = f.read()
        read |= set(re.findall(r'(?:model_cfg|\["model"\]|\bmodel)(?:\.get\(|\[)"(\w+)"', text))
    assert {"path", "head_modules", "from_config", "openclip"} <= read
    assert read <= model_keys(), sorted(read - model_keys())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp16_mixed_precision_with_float16_trainable_weights_is_refused(tmp_path, images, method):
    """model.dtype=float16 with trainer.fp16=true: PEFT keeps the adapters fp32, but the task head
    (and a full fine-tune's every weight) stays float16, whose gradients fp16 mixed precision cannot
    unscale (torch's GradScaler refuses them at the first step, checked here on those very weights).
    The job is refused before its Trainer is built; LoRA on a causal LM (no head) is not."""
    import types

    import torch
    from omegaconf import OmegaConf

    from pilora import MethodConfig, prepare_model
    from pilora.runner.trainer_args import check_trainable_dtypes
    from pilora.runner.validate import ConfigError
    from pilora.tasks.base import make_task

    cfg = OmegaConf.to_container(compose_cfg(images + ["model.dtype=float16"], tmp_path / "o"), resolve=True)
    task = make_task(cfg["task"], cfg["model"])
    model = task.build_model()
    targets = list(cfg["model"]["target_modules"])
    if method == "lora":
        lora = MethodConfig(name="lora", r=2, target_modules=targets, modules_to_save=list(task.head_modules))
        model = prepare_model(model, lora, task_type=task.task_type)
    else:
        model = prepare_model(model, MethodConfig(name="full", target_modules=targets))
    half = [p for p in model.parameters() if p.requires_grad and p.dtype == torch.float16]
    assert half  # the head's (LoRA) / every weight (full)
    for p in half:
        p.grad = torch.ones_like(p)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # as a training step begins
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.SGD(half, lr=0.1))
    fp16 = types.SimpleNamespace(fp16=True)
    with pytest.raises(ConfigError, match=r"trainer.fp16=true .* float16 \(e.g. .*Set model.dtype=float32") as err:
        check_trainable_dtypes(fp16, model)
    assert f"{len(half)} trainable tensor(s)" in str(err.value)
    assert method == "full" or "classifier" in str(err.value)
    check_trainable_dtypes(types.SimpleNamespace(fp16=False), model)  # no scaler: trains in float16
    from conftest import tiny_llama_and_tokenizer

    llama, _ = tiny_llama_and_tokenizer()
    lora = prepare_model(llama.half(), MethodConfig(name="lora", r=2, target_modules=["q_proj", "v_proj"]))
    check_trainable_dtypes(fp16, lora)  # fp32 adapters on a float16 base, nothing else trains
