"""What Hydra needs from this project, kept out of the importable library (``pilora`` needs no Hydra):

* the schema of ``conf/method/``: :class:`pilora.methods.MethodConfig` (every method accepts every
  key; Hydra rejects any other), stored as ``schema/method`` and included by ``conf/method/_base.yaml``;
* ``${job_dirname:...}``: a job's folder name from its overrides, without the ``method.*`` keys
  its method does not use, so ``-m method=lora,pilora method.supplementary_r=1,2`` makes one LoRA
  folder (and one LoRA job: the second finds the first's record, or, run in parallel with it, is a
  duplicate; see :func:`pilora.runner.jobdir.open_job`);
* ``${row_name:${method.label},${method.name}}``: the method's name in records and folders;
* :class:`PrintSummary`, the table printed after every multirun;
* tab completion of nested choices (``task=glue/<TAB>`` -> ``task=glue/mrpc``, ...), which Hydra's
  completion (``python run.py --shell-completion install=bash``) does not offer by itself, and of
  nothing ``run.py`` would refuse (no ``_`` bases, no ``method=partition/...``, no schema); the
  same for ``--help``'s list of groups;
* :func:`check_overrides`: the options of a nested group and the keys of ``method`` when an
  override names neither (Hydra lists the options of a top-level group itself);
* ``trainer.<key>=...``, ``task.<key>=...`` and ``task.generation.<key>=...`` for a key the composed
  config does not spell out (a ``TrainingArguments`` field the YAML leaves at its default, a task
  key at its schema default): taken as ``+trainer.<key>=...`` (:func:`_apply_overrides_to_config`),
  so that the job's checks (:func:`check_job`) accept a real setting and name a typo with the
  valid keys, instead of Hydra's "Could not override ... Key '<key>' is not in struct".

Importing this module registers all of these (``run.py`` and the tests do).
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import os
import re
import sys

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.plugins.completion_plugin import CompletionPlugin
from omegaconf import DictConfig, OmegaConf

from pilora.hints import did_you_mean
from pilora.methods import METHODS, MethodConfig, PartitionConfig, Stage1Config, applicable_keys
from pilora.runner.config import register_resolvers, safe_dirname
from pilora.runner.summary import format_table, summary_rows, swept_keys


def job_dirname(overrides, exclude_keys, method: str, match_budget: bool = False, family: str | None = None) -> str:
    """Hydra's ``override_dirname`` (sorted ``key=value`` overrides joined by ``,``, without
    ``exclude_keys``) minus the ``method.<key>`` overrides that ``method`` does not use and the
    ``task.<key>`` overrides of the task ``family``'s evaluation-only keys (they leave the trained
    weights as they are: those jobs share one folder, and each scores its test sets into its record,
    :func:`pilora.runner.evaluate.plan`), as one safe folder name (:func:`pilora.runner.config.safe_dirname`)."""
    from pilora.tasks import FAMILIES

    used = set(applicable_keys(method, bool(match_budget))) if method in METHODS else None
    scoring = set(FAMILIES[family].evaluation_keys) if family in FAMILIES else set()
    lines = []
    for override in OverridesParser.create().parse_overrides(list(overrides or [])):
        key = override.key_or_group
        if key in set(exclude_keys or ()):
            continue
        parts = key.lstrip("+~").replace("/", ".").split(".")  # method.<key>=... and method/partition=...
        if used is not None and parts[0] == "method" and len(parts) > 1 and parts[1] not in used:
            continue
        if parts[0] == "task" and len(parts) > 1 and parts[1] in scoring:
            continue
        lines.append(override.input_line)
    return safe_dirname(",".join(sorted(lines)))


def nested_choices(config_loader, group: str, config_name: str | None = None, overrides=()) -> list[str]:
    """Every config under ``group``, nested ones as ``sub/choice`` (``glue/mrpc``)."""
    out = []
    for kind in (ObjectType.CONFIG, ObjectType.GROUP):
        for name in config_loader.get_group_options(
            group_name=group, results_filter=kind, config_name=config_name, overrides=list(overrides)
        ):
            if kind is ObjectType.CONFIG:
                out.append(name)
            else:
                out += [f"{name}/{c}" for c in nested_choices(config_loader, f"{group}/{name}", config_name, overrides)]
    return sorted(out)


_hydra_query_groups = CompletionPlugin._query_config_groups


def _query_config_groups(self, word, config_name, words):
    """Hydra's completion, plus the nested choices of a group (``task=glue/mrpc``)."""
    matched, exact = _hydra_query_groups(self, word, config_name, words)
    prefix = word[0] if word[:1] in ("+", "~") else ""
    group, eq, value = word[len(prefix) :].rpartition("=")
    if eq and group:
        nested = [
            f"{prefix}{group}={c}"
            for c in nested_choices(self.config_loader, group, config_name, words)
            if "/" in c and c.startswith(value)
        ]
        matched = sorted(set(matched) | set(nested))
        exact = exact or bool(nested)
    return _choosable(matched), exact


HIDDEN_GROUPS = ("schema",)  # the method schema: included by conf/method/_base.yaml, never chosen


def _choosable(words: list[str]) -> list[str]:
    """Completions less what ``run.py`` refuses: the ``_`` bases (``method=_base``, ``task=glue/_glue``),
    a section's files offered as a group's choices (``method=partition/random``; the group is
    ``method/partition``) and the schema group."""
    out = []
    for word in words:
        bare = word.lstrip("+~")
        group, eq, value = bare.partition("=")
        if group.split("/")[0].split(".")[0] in HIDDEN_GROUPS:
            continue
        if eq and value and os.path.isdir(os.path.join(CONF, group)) and not group.startswith("hydra"):
            if value not in group_options(group) and value != "null":
                continue
        out.append(word)
    return out


_hydra_format_groups = Hydra.format_config_groups


def _format_config_groups(self, predicate, compact: bool = True) -> str:
    """``--help``'s list of groups: what can be chosen (:func:`group_options`), without the
    ``_`` bases and the schema group."""
    text = _hydra_format_groups(self, lambda g: predicate(g) and g.split("/")[0] not in HIDDEN_GROUPS, compact)
    if not compact:
        return text
    lines = []
    for line in text.splitlines():
        group, sep, items = line.partition(": ")
        if sep and os.path.isdir(os.path.join(CONF, group)):
            keep = [o for o in items.split(", ") if not o.startswith("_")]
            if not keep:
                continue
            line = f"{group}: {', '.join(keep)}"
        lines.append(line)
    return "\n".join(lines)


# sections whose every key the job checks (pilora.runner.trainer_args.check_trainer_keys,
# pilora.tasks.schema.TaskSettings, the generation family's GenerationConfig check), so that a key
# one of them does not spell out can be set without `+`: a real setting is accepted, a typo refused
ADDABLE_SECTIONS = ("trainer", "task", "task.generation")

_hydra_apply_overrides = ConfigLoaderImpl._apply_overrides_to_config


def _apply_overrides_to_config(overrides, cfg) -> None:
    """Hydra's, with ``trainer.<key>=v`` (and ``task.<key>``, ``task.generation.<key>``) taken as
    ``+trainer.<key>=v`` when the composed config has no ``<key>`` there: the README's "trainer keys
    are TrainingArguments fields" holds for the fields ``conf/trainer/default.yaml`` leaves out
    (``trainer.torch_compile=true``), and a typo (``trainer.learning_rat``) reaches the job's checks,
    which name it with the valid keys, instead of Hydra's "Key 'learning_rat' is not in struct"."""
    overrides = [_as_add(o, cfg) for o in overrides]
    for override in overrides:
        _empty_before_merge(override, cfg)
    _hydra_apply_overrides(overrides, cfg)


def _empty_before_merge(override, cfg) -> None:
    """OmegaConf cannot merge a dict into an ``Optional[Dict]`` key that is null
    (``method.rank_pattern={query:4}``: "'NoneType' object has no attribute 'get'"); such a key is
    set to an open ``{}`` first, so the override sets exactly its dict."""
    if override.type is not OverrideType.CHANGE or override.is_sweep_override() or override.package is not None:
        return
    if not isinstance(override.value(), dict):
        return
    section, _, leaf = override.key_or_group.rpartition(".")
    parent = OmegaConf.select(cfg, section, throw_on_missing=False) if section else cfg
    if isinstance(parent, DictConfig) and leaf in parent and parent._get_node(leaf)._is_none():
        parent[leaf] = {}
        OmegaConf.set_struct(parent[leaf], False)  # its keys are the user's (module names), not a schema's


def _as_add(override, cfg):
    if override.type is not OverrideType.CHANGE or override.package is not None:
        return override
    section, _, leaf = override.key_or_group.rpartition(".")
    if section not in ADDABLE_SECTIONS:
        return override
    node = OmegaConf.select(cfg, section, throw_on_missing=False, throw_on_resolution_failure=False)
    if isinstance(node, DictConfig) and leaf in node:
        return override
    return dataclasses.replace(override, type=OverrideType.ADD)


CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
_SECTIONS = {"method": MethodConfig, "method.stage1": Stage1Config, "method.partition": PartitionConfig}


def group_options(group: str, conf_dir: str = CONF) -> list[str]:
    """Options of a config group, nested ones as ``glue/mrpc`` (files starting with ``_`` are
    bases other files include; a folder that is a section of the group's schema, like
    ``method/partition``, is a group of its own, not a set of options)."""
    base = os.path.join(conf_dir, group)
    options = (
        os.path.relpath(p, base)[:-5].replace(os.sep, "/")
        for p in glob.glob(os.path.join(base, "**", "*.yaml"), recursive=True)
        if not os.path.basename(p).startswith("_")
    )
    return sorted(o for o in options if "/" not in o or f"{group}.{o.split('/')[0]}" not in _SECTIONS)


def check_overrides(args: list[str], conf_dir: str = CONF) -> str | None:
    """An error for what Hydra reports without the options, or with wrong ones: a ``method.<key>``
    that no method has (with the valid keys), and an unknown choice of a ``conf/`` group
    (``task=glue/nope``, ``method=_base``, with the options that can be chosen). Hydra's own errors
    stand for everything else."""
    from hydra._internal.utils import get_args

    try:
        overrides = OverridesParser.create().parse_overrides(get_args(list(args)).overrides)
    except (Exception, SystemExit):  # a malformed command line: Hydra reports it
        return None
    known = top_level_keys(conf_dir)
    for o in overrides:
        key = o.key_or_group
        section, _, leaf = key.rpartition(".")
        root = key.split(".")[0].split("/")[0]
        if o.is_add() and root not in known and not root.startswith("hydra"):
            # `+foo=bar` adds a key no part of the project reads: a typo, or a setting that belongs
            # in a section (trainer.*, task.*, method.*)
            return f"unknown top-level key {root!r} (from {o.input_line!r}); the config's keys are: {', '.join(known)}"
        if section in _SECTIONS and not o.is_delete():
            valid = [f.name for f in dataclasses.fields(_SECTIONS[section])]
            if leaf not in valid:
                return f"unknown key {key!r}; valid keys of {section}: {', '.join(valid)}"
        elif (
            "." not in key
            and os.path.isdir(os.path.join(conf_dir, key))
            and not key.startswith("hydra")
            and not o.is_delete()
        ):
            # every choice of a conf/ group, so that the list holds what can be chosen: nested
            # options (glue/mrpc), neither the _ bases nor a subgroup's files, which Hydra would list
            options = group_options(key, conf_dir)
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            unknown = [v for v in values if v not in options and v != "null"]
            if unknown:
                return f"unknown {key} {unknown[0]!r}; choose one of: {', '.join(options)}"
            needs = [PLUGINS[key, v] for v in values if (key, v) in PLUGINS and not _installed(PLUGINS[key, v][0])]
            if needs:
                return f"{key}={values[0]} needs the Hydra plugin {needs[0][0]}: {needs[0][1]}"
    return None


# choices whose configs name a Hydra plugin that is an extra, not a dependency: (module, how to install)
PLUGINS = {("hparams_search", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", 'pip install -e ".[optuna]"')}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


DIRECTIONS = {"max": "maximize", "min": "minimize"}


def direction_of(metric_mode: str) -> str:
    """``${direction_of:${task.metric_mode}}``: a task's metric mode as an Optuna study direction
    (conf/hparams_search/optuna.yaml)."""
    if metric_mode not in DIRECTIONS:
        raise ValueError(f"task.metric_mode must be one of {sorted(DIRECTIONS)}, got {metric_mode!r}")
    return DIRECTIONS[metric_mode]


def job_config_saver(cfg):
    """``on_open`` for :func:`pilora.runner.train.train`: what Hydra writes into ``<job>/.hydra``
    (``config.yaml`` = ``cfg``, ``hydra.yaml``, ``overrides.yaml``), written by the job once the
    folder is its own. ``conf/config.yaml`` sets ``hydra.output_subdir: null``, so a run that folder
    refuses (StaleJob, JobLocked, a bad value) leaves the config of the job that made it in place."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()

    def save(folder: str) -> None:
        out = os.path.join(folder, ".hydra")
        os.makedirs(out, exist_ok=True)
        for name, node in (
            ("config.yaml", cfg),
            ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
            ("overrides.yaml", hydra_cfg.overrides.task),
        ):
            with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(node))

    return save


def top_level_keys(conf_dir: str = CONF) -> list[str]:
    """Keys of the composed config's top level: ``conf/config.yaml``'s own and its groups."""
    root = OmegaConf.load(os.path.join(conf_dir, "config.yaml"))
    groups = [d for d in os.listdir(conf_dir) if os.path.isdir(os.path.join(conf_dir, d)) and d != "hydra"]
    return sorted({*(k for k in root if k not in ("defaults", "hydra")), *groups})


def sweep_points(overrides: list[str], hydra_cfg) -> list[list[str]] | None:
    """The override list of every point of a basic-sweeper multirun (the command line's sweeps and
    an experiment's ``hydra.sweeper.params``), as Hydra's BasicSweeper expands them; None for other
    sweepers (Optuna picks its points as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(overrides))
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


# launchers that run a multirun's jobs as processes of this machine; any other (submitit_slurm, ray,
# rq) runs them on a cluster's nodes, whose GPUs the login node submitting them need not have
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher")


def runs_here(hydra_cfg, sweep: bool) -> bool:
    """Whether the jobs run on this machine: a single run always does (Hydra launches it in this
    process), a multirun where its launcher is one of :data:`LOCAL_LAUNCHERS`."""
    return not sweep or str(hydra_cfg.launcher.get("_target_", "")).rsplit(".", 1)[-1] in LOCAL_LAUNCHERS


def check_job(args: list[str], conf_dir: str = CONF) -> str | None:
    """The one-line error of a run whose settings cannot run (:func:`pilora.runner.validate.check_config`),
    found before Hydra makes any folder: of the single job, or of every point of a basic sweep (so
    that a bad value in point 37 stops the sweep before point 1 trains). None when all can run,
    or when Hydra itself will report the command line. Jobs sent to other machines (SLURM) are
    checked here for everything but this machine's GPU (:func:`runs_here`); each job checks that
    where it runs, before it trains."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args

    try:
        parsed = get_args(list(args))
    except (Exception, SystemExit):
        return None
    if parsed.help or parsed.hydra_help or parsed.cfg or parsed.info or parsed.shell_completion:
        return None
    from pilora.runner.errors import expected_message
    from pilora.runner.validate import check_config

    name = parsed.config_name or "config"
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            plain = [o for o in parsed.overrides if "," not in o.partition("=")[2] and "(" not in o]
            try:
                base = compose(config_name=name, overrides=plain, return_hydra_config=True)
            except ConfigCompositionException as err:
                return unknown_key_message(err, name, plain)
            sweep = parsed.multirun or str(base.hydra.mode) == "RunMode.MULTIRUN"
            points = sweep_points(parsed.overrides, base.hydra) if sweep else [parsed.overrides]
            here = runs_here(base.hydra, sweep)
            for point in points or []:
                try:
                    cfg = compose(config_name=name, overrides=point)
                except ConfigCompositionException as err:
                    return unknown_key_message(err, name, point)
                cfg.output_dir = ""  # ${hydra:runtime.output_dir}: not known before Hydra runs
                try:
                    check_config(cfg, device_checks=here)
                except Exception as err:  # noqa: BLE001 - a bug is left to raise in the job, with its traceback
                    message = expected_message(err)
                    if message is None:
                        return None
                    return f"{message} (sweep point: {' '.join(point)})" if sweep else message
    except Exception:  # noqa: BLE001 - Hydra reports composition errors itself
        return None
    return None


_NOT_OVERRIDABLE = re.compile(r"Could not override '([^']+)'")


def unknown_key_message(err: Exception, name: str, overrides: list[str]) -> str | None:
    """For Hydra's "Could not override 'model.nme'" (a key the composed config does not have,
    outside the sections whose keys the job checks itself, ``ADDABLE_SECTIONS``): the keys that
    level has, the closest one, and the ``+`` that adds a new key. None for other composition
    errors (Hydra reports them). Runs inside ``initialize_config_dir``."""
    from hydra import compose
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    found = _NOT_OVERRIDABLE.match(str(err))
    if not found or not isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)):
        return None
    key = found.group(1)
    try:
        cfg = compose(config_name=name, overrides=[o for o in overrides if o.partition("=")[0] != key])
    except Exception:  # noqa: BLE001 - another error: Hydra reports the command line
        return None
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):  # the first level that lacks the key's next part
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            break
        node = node[part]
    else:
        return None
    section, leaf = ".".join(parts[:depth]), parts[depth]
    keys = sorted(str(k) for k in node)
    return (
        f"unknown key {key!r}: {'the config' if not section else section} has no key {leaf!r}"
        + did_you_mean(leaf, keys, prefix=f"{section}." if section else "")
        + f"; its keys: {', '.join(keys)}"
        # a new top-level key is refused (check_overrides: nothing would read it)
        + (f". To add a key it does not have, write +{key}=..." if section else "")
    )


def register() -> None:
    """Resolvers (the library's and ``job_dirname``), the method schema and the patches of Hydra
    above (completion, ``--help``, overrides of keys a section leaves out); idempotent."""
    register_resolvers()
    resolvers = {
        "job_dirname": job_dirname,
        "row_name": lambda label, name: label or name,
        "direction_of": direction_of,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(group="schema", name="method", node=MethodConfig)
    CompletionPlugin._query_config_groups = _query_config_groups
    Hydra.format_config_groups = _format_config_groups
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(_apply_overrides_to_config)


class FailedPoint(float):
    """What a basic sweep's point returns when it stops on an error the user can fix (a diverged
    learning rate, a folder of another config, a bad data file) or on a bug, instead of ending the whole sweep:
    NaN (no value to compare), carrying the message for the closing table (:class:`PrintSummary`)."""

    def __new__(cls, message: str):
        point = super().__new__(cls, "nan")
        point.message = message
        return point

    def __reduce__(self):  # a launcher's worker process hands it back pickled (submitit)
        return FailedPoint, (self.message,)


def point_error_handler(hydra_cfg):
    """How a job ends on an error (``on_error`` of :func:`pilora.runner.errors.exit_on_expected`):
    a point of a basic-sweeper multirun returns a :class:`FailedPoint` (a fixable error's message,
    or a bug's, its traceback logged) and the other points still run; a single run, and a trial of a sweeper
    that stops at a failed trial anyway (Hydra's Optuna sweeper raises on a NaN), exits with the
    message (None)."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN or not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    return FailedPoint


# <sweep dir>/sweep_points.jsonl: one line per job of the latest multirun there (its folder and its
# error, if any), appended by the job itself, so that any launcher's workers (submitit, SLURM) add to it
SWEEP_POINTS = "sweep_points.jsonl"


def read_sweep_points(sweep_dir: str) -> list[dict] | None:
    """The jobs of the latest multirun into ``sweep_dir``, in the order they ended; None when no
    multirun there listed its jobs."""
    try:
        with open(os.path.join(sweep_dir, SWEEP_POINTS), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    points = []
    for line in lines:
        try:
            points.append(json.loads(line))
        except ValueError:  # a line cut short by a killed job
            continue
    return points


class PrintSummary(Callback):
    """After every multirun, print the table of its records (conf/config.yaml hydra.callbacks), with
    the value of each swept key and each job's folder: the jobs of this multirun only (a sweep folder
    also keeps the records of earlier sweeps into it), then the points that failed, with their
    errors. A failed point ends itself, not the sweep; the multirun then exits with status 1."""

    def on_multirun_start(self, config, **kwargs):
        sweep_dir = str(config.hydra.sweep.dir)
        os.makedirs(sweep_dir, exist_ok=True)
        open(os.path.join(sweep_dir, SWEEP_POINTS), "w").close()  # this multirun's list starts empty

    def on_job_end(self, config, job_return, **kwargs):
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        value = job_return._return_value  # .return_value would raise a failed job's error here
        if isinstance(value, FailedPoint):
            error = value.message
        elif job_return.status is JobStatus.FAILED:  # a bug: Hydra raises it once the batch has run
            error = f"{type(value).__name__}: {value}"
        else:
            error = None
        line = json.dumps({"folder": os.path.abspath(hydra_cfg.runtime.output_dir), "error": error}) + "\n"
        # one short O_APPEND write under flock: lines of parallel jobs neither interleave nor, on NFS
        # (where O_APPEND is not atomic across hosts: SLURM jobs on several nodes), overwrite each other
        fd = os.open(os.path.join(str(config.hydra.sweep.dir), SWEEP_POINTS), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks: the append alone
                pass
            os.write(fd, line.encode())
        finally:
            os.close(fd)  # releases the lock

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = str(config.hydra.sweep.dir)
        swept = swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        rows = summary_rows(sweep_dir, swept)
        points = read_sweep_points(sweep_dir)
        failed = [p for p in points or () if p.get("error")]
        if points:  # a failed point's folder holds what was there before it (another config's run), not its result
            done = {p["folder"] for p in points} - {p["folder"] for p in failed}
            rows = [r for r in rows if os.path.abspath(r["path"]) in done]
        print("\n" + format_table(rows), flush=True)
        if failed:
            for p in failed:
                print(f"failed: {os.path.relpath(p['folder'], sweep_dir)}: {p['error']}", flush=True)
            sys.exit(
                f"error: {len(failed)} of {len(points)} sweep points failed (listed above, each with its error). "
                "Fix them and rerun the same command: the points that finished are reused, not trained again"
            )


register()
