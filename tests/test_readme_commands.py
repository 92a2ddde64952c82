"""Every ``run.py`` command in README.md and experiments/README.md composes, sweep values included,
and its method section builds the typed method config (nothing is trained here)."""

import os
import re
import shlex

import pytest
from helpers import CONF
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from pilora.runner.train import _method_settings

ROOT = os.path.dirname(CONF)
DOCS = ("README.md", os.path.join("experiments", "README.md"))
# what the documents leave to the reader
PLACEHOLDERS = {"hydra/launcher": "slurm", "task.dataset.root": "/data/LLM-Adapters"}


def readme_commands() -> list[tuple[str, str]]:
    """``(document, command)`` for every ``run.py`` command line, with ``\\`` continuations joined,
    including the commented ``# = python run.py ...`` equivalents and inline `` `...` `` ones."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        text = re.sub(r"\\\n#?\s*", " ", text)  # continuation lines (also inside "# = ..." comments)
        for line in text.splitlines():
            for match in re.finditer(r"(?:python |torchrun [^`]*?|accelerate launch [^`]*?)run\.py([^`\n]*)", line):
                args = match.group(1).split(" # ")[0].strip()
                found.append((doc, args))
    return found


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
    assert docs == set(DOCS) and len(COMMANDS) >= 25
    # the mixed-method sweeps of Figs. 4-6 are among them
    assert any("method=pilora,lora_matched" in c and "supplementary_r=0,1,2" in c for _, c in COMMANDS)


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
def test_readme_command_composes(doc, args):
    for overrides in job_overrides(args):
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
