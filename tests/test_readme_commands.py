"""Every command the documents show is checked without training anything: each ``run.py`` command
(README.md, experiments/README.md, docs/*.md, benchmarks/README.md) composes, sweep values included,
and its method section builds the typed method config; each ``python -m analysis.*`` /
``benchmarks.*`` / ``pilora.*`` command, and each ``make <target> ARGS="..."`` whose recipe runs one,
is accepted by that module's own command line."""

import argparse
import glob
import os
import re
import runpy
import shlex
import sys
import warnings

import pytest
from helpers import CONF
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from pilora.runner.train import _method_settings

ROOT = os.path.dirname(CONF)
DOCS = (
    "README.md",
    os.path.join("experiments", "README.md"),
    *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
    os.path.join("benchmarks", "README.md"),
)
# what the documents leave to the reader
PLACEHOLDERS = {"hydra/launcher": "slurm", "task.dataset.root": "/data/LLM-Adapters"}
PLACEHOLDER_PATH = "/tmp/placeholder"


def _doc_text(doc: str) -> str:
    """The document with ``\\`` continuation lines joined (also inside ``# = ...`` comments)."""
    text = open(os.path.join(ROOT, doc)).read()
    return re.sub(r"\\\n#?\s*", " ", text)


def readme_commands() -> list[tuple[str, str]]:
    """``(document, command)`` for every ``run.py`` command line, with ``\\`` continuations joined,
    including the commented ``# = python run.py ...`` equivalents and inline `` `...` `` ones."""
    found = []
    for doc in DOCS:
        for line in _doc_text(doc).splitlines():
            for match in re.finditer(r"(?:python |torchrun [^`]*?|accelerate launch [^`]*?)run\.py([^`\n]*)", line):
                args = match.group(1).split(" # ")[0].strip()
                found.append((doc, args))
    return found


def doc_configs(doc: str) -> dict[str, str]:
    """``{path under conf/: text}`` of the YAML blocks a document writes out (first line
    ``# conf/<group>/<name>.yaml``): the configs its own commands use (``task=gsm8k``)."""
    blocks = re.findall(r"```yaml\n# conf/(\S+\.yaml)\n(.*?)```", open(os.path.join(ROOT, doc)).read(), re.S)
    return dict(blocks)


def job_overrides(args: str) -> list[list[str]]:
    """The jobs to compose for one command: each sweep value once, the other axes at their first value."""
    words = [w for w in shlex.split(args.replace("$STAGE1", "/tmp/stage1/importance.pt")) if not w.startswith("-")]
    words = [w.replace("=…", "=...") for w in words]
    fixed, axes = [], []
    for o in OverridesParser.create().parse_overrides(words):
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            value = o.get_value_element_as_str() if o.value() is not None else "null"
            fixed.append(
                f"{key}={PLACEHOLDERS.get(key, '/tmp/placeholder')}" if value in ("...", "…") else o.input_line
            )
    if not words:  # `python run.py` alone is the demo
        fixed = ["experiment=demo"]
    jobs = [fixed + [a[0] for a in axes]]
    for i, axis in enumerate(axes):
        for v in axis[1:]:
            jobs.append(fixed + [a[0] for a in axes[:i]] + [v] + [a[0] for a in axes[i + 1 :]])
    return jobs


COMMANDS = readme_commands()
_checked: set[tuple[str, ...]] = set()  # a job that several commands share is composed once


def test_the_documents_have_their_commands():
    docs = {d for d, _ in COMMANDS}
    assert {"README.md", os.path.join("experiments", "README.md"), os.path.join("docs", "adding-a-task.md")} <= docs
    assert len(COMMANDS) >= 25
    # the mixed-method sweeps of Figs. 4-6 are among them
    assert any("method=pilora,lora_matched" in c and "supplementary_r=0,1,2" in c for _, c in COMMANDS)
    # a document's own config (docs/adding-a-task.md's conf/task/gsm8k.yaml) is what its command composes
    assert "task/gsm8k.yaml" in doc_configs(os.path.join("docs", "adding-a-task.md"))


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides, return_hydra_config=True)


def _sweep_values(key, spec) -> list[str]:
    """``key=value`` for each value a sweeper's search space names: a basic sweeper's comma list,
    an Optuna ``choice(...)`` each option, an ``interval(...)`` (``tag(log, ...)`` included) its two ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    value = OverridesParser.create().parse_override(f"{key}={spec}").value()
    if isinstance(value, ChoiceSweep):
        values = value.list
    elif isinstance(value, IntervalSweep):
        values = [value.start, value.end]
    elif isinstance(value, RangeSweep):
        values = [value.start]
    else:
        values = str(spec).split(",")
    return [f"{key}={v}" for v in values]


@pytest.mark.slow
@pytest.mark.parametrize("doc,args", COMMANDS, ids=[f"{d}:{c[:70]}" for d, c in COMMANDS])
def test_readme_command_composes(doc, args, tmp_path):
    searchpath = []
    if doc_configs(doc):  # the configs the document writes out, in a config folder of their own
        for rel, text in doc_configs(doc).items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        searchpath = [f"hydra.searchpath=[file://{tmp_path}]"]
    for overrides in job_overrides(args):
        overrides = overrides + searchpath
        cfg = _compose(overrides)
        sweep = OmegaConf.to_container(cfg.hydra.sweeper).get("params") or {}
        # an experiment overlay's own sweep: each of its values once
        extra = [
            _sweep_values(k, vals) for k, vals in sweep.items() if not any(o.split("=")[0] == k for o in overrides)
        ]
        jobs = [overrides + [a[0] for a in extra]] + [
            overrides + [a[0] for a in extra[:i]] + [v] + [a[0] for a in extra[i + 1 :]]
            for i, axis in enumerate(extra)
            for v in axis[1:]
        ]
        for job in jobs:
            if tuple(sorted(job)) in _checked:
                continue
            _checked.add(tuple(sorted(job)))
            c = _compose(job)
            HydraConfig.instance().set_config(c)  # ${hydra:...} resolves as in a job
            with open_dict(c):
                del c["hydra"]
            c.output_dir = "unused"
            plain = OmegaConf.to_container(c, resolve=True)
            method, recorded, _ = _method_settings(plain)
            assert recorded["method"]["name"] == method.name


# ----------------------------------------------------------------- python -m <module> commands

MODULE_PACKAGES = ("analysis", "benchmarks", "pilora")
# a document's value placeholders (`python -m pilora.methods [METHOD]`), as a reader fills them in
VALUES = {"METHOD": "pilora"}


def make_modules() -> dict[str, str]:
    """``{make target: module}`` for the Makefile targets whose recipe is ``python -m <module> $(ARGS)``."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    return dict(re.findall(r"^([\w-]+):[^\n]*\n\t\$\(BIN\)/python -m ([\w.]+) \$\(ARGS\)", text, re.M))


def _variants(args: str) -> list[list[str]]:
    """The argument lists one documented command stands for: ``<...>`` placeholders (``<run dir>...``)
    become a path, and optional ``[...]`` groups are left out in one variant and all given in the other."""
    args = args.replace("$STAGE1", "/tmp/stage1/importance.pt")
    args = re.sub(r"<[^>]+>(?:\.\.\.)?", "placeholder", args)
    optional = r"(?<!\S)\[([^\]]*)\]"  # `[--quick]`, not a Hydra list (`task.eval_only=[piqa]`)
    without = re.sub(optional, "", args)
    with_all = re.sub(optional, r"\1", args)
    out = []
    for variant in dict.fromkeys([without, with_all]):
        out.append([VALUES.get(w, w) for w in shlex.split(variant)])
    return out


def module_commands() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(document, module, argv)`` for every ``python -m analysis.* | benchmarks.* | pilora.*``
    command of the documents (in code blocks, inline code and ``# = ...`` comments; a trailing
    comment, the end of inline code, a ``)`` closing ``$(...)`` or a table's ``|`` ends it) and
    every ``make <target> [ARGS=...]`` whose recipe runs such a module."""
    make = make_modules()
    found = []
    for doc in DOCS:
        for line in _doc_text(doc).splitlines():
            pattern = rf"python -m ((?:{'|'.join(MODULE_PACKAGES)})(?:\.\w+)+)([^`\n|)]*)"
            for m in re.finditer(pattern, line):
                for argv in _variants(m.group(2).split(" # ")[0]):
                    found.append((doc, m.group(1), tuple(argv)))
            for m in re.finditer(r"make ([\w-]+)(?: ARGS=(\"[^\"]*\"|\S+))?", line):
                if m.group(1) in make:
                    argv = shlex.split(shlex.split(m.group(2))[0]) if m.group(2) else []
                    found.append((doc, make[m.group(1)], tuple(argv)))
    return list(dict.fromkeys(found))


MODULE_COMMANDS = module_commands()


class _Parsed(Exception):
    """Raised once a module's command line parsed: the test stops the module there."""


def _stop_after_parsing(monkeypatch) -> None:
    """Every ``ArgumentParser.parse_*`` entry point parses as usual (errors included) and then raises
    :class:`_Parsed` instead of returning to the module, so nothing the command does runs."""
    depth = [0]

    def stopping(orig):
        def parse(self, *args, **kwargs):
            depth[0] += 1
            try:
                out = orig(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:  # the module's own call, not one argparse makes inside another
                raise _Parsed(out)
            return out

        return parse

    for name in ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, stopping(getattr(argparse.ArgumentParser, name)))


def test_the_documents_have_their_module_commands():
    modules = {m for _, m, _ in MODULE_COMMANDS}
    assert {
        "analysis.tables",
        "analysis.figures",
        "analysis.records",
        "benchmarks.step_time",
        "benchmarks.gpu_llama",
        "benchmarks.stage2_options",
        "benchmarks.memory_proxy",
        "pilora.paper_params",
        "pilora.runner.evaluate",
        "pilora.export",
        "pilora.tasks.openclip",
        "pilora.methods",
    } <= modules
    assert {d for d, _, _ in MODULE_COMMANDS} >= {os.path.join("benchmarks", "README.md"), "README.md"}
    # `make bench --quick` would hand --quick to make: arguments go through ARGS="..."
    for doc in DOCS:
        bad = re.findall(r"make [\w-]+ --[^`\n]*", open(os.path.join(ROOT, doc)).read())
        assert not bad, f'{doc}: {bad} (make takes the module\'s arguments as ARGS="...")'


@pytest.mark.parametrize(
    "doc,module,argv", MODULE_COMMANDS, ids=[f"{d}:{m} {' '.join(a)}"[:90] for d, m, a in MODULE_COMMANDS]
)
def test_module_command_parses(doc, module, argv, monkeypatch, capsys):
    """``python -m <module> <argv>`` as the document writes it: the module's own argparse parser accepts
    the arguments (the command then stops); a module without a parser (``pilora.methods``) runs."""
    _stop_after_parsing(monkeypatch)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except _Parsed:
            return
        except SystemExit as exit:
            assert exit.code in (0, None), f"{doc}: python -m {module} {shlex.join(argv)}: {capsys.readouterr().err}"
    assert module == "pilora.methods", f"python -m {module} ran without parsing a command line"
    assert "method.r " in capsys.readouterr().out  # its listing of the method keys
