"""What a method is, as the runner sees it: :class:`Method`, the registries, and plain-LoRA building.

A method answers every question the runner asks about it (``pilora.runner.train``): its PEFT
config, what it does before training (:meth:`Method.before_training`: PiLoRA's stage 1, a budget
match), how its model is built, its trainer callbacks, how it is saved and what its record holds.
The defaults here are a PEFT LoRA with a named init; a method module overrides what differs and
registers an instance (:func:`register_method`). Nothing here imports the runner, Hydra or, at
import time, torch: ``run.py`` loads the registry to compose and check a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from ..peft_layers import lora_layers

if TYPE_CHECKING:
    from torch import nn

    from .config import MethodConfig

INITS: dict[str, Callable] = {}
METHODS: dict[str, "Method"] = {}


def register_init(name: str):
    """Decorator: ``fn(layer, adapter_name, cfg)`` initialises one PEFT LoRA layer after injection."""

    def deco(fn):
        INITS[name] = fn
        return fn

    return deco


def register_method(name: str, method: "Method") -> "Method":
    """Make ``method`` the method ``name`` (``method.name`` in configs); returns the registered object."""
    METHODS[name] = registered = replace(method, name=name)
    return registered


@dataclass
class JobContext:
    """What the runner lends a method's hooks for one job."""

    out: str  # the job's folder
    task: Any  # the pilora.tasks.Task
    trainer: dict  # the job's trainer section (TrainingArguments keys)
    main: bool = True  # this process writes files (rank 0)
    # runs (or reuses) PiLoRA's stage 1 for a config: (ImportanceStats, the file they are in)
    stage1: Callable[["MethodConfig"], tuple] | None = None


@dataclass
class Plan:
    """What a method settled before training, for one job."""

    config: "MethodConfig"  # the job's own config (derived by ``dataclasses.replace``, never mutated)
    masks: dict | None = None  # PiLoRA's dominant rows: the model of stage 2
    stats: Any = None  # stage 1's ImportanceStats (checked against the model before use)
    stats_path: str | None = None
    stage: str = "train"  # the folder and clock name of the training run
    title: str = ""  # how the log names the training run
    sections: dict = field(default_factory=dict)  # record sections known before training
    callbacks: list = field(default_factory=list)  # trainer callbacks (set by Method.callbacks)


@dataclass(frozen=True)
class Method:
    """A method: a PEFT LoRA plus extra ``LoraConfig`` fields and a per-layer init, unless a
    subclass changes a hook. The fields are the traits the runner and the generic tests read."""

    lora_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str = "default"  # key of INITS
    two_stage: bool = False  # PiLoRA's stage 1 before training
    # the init moves part of W0 into the adapter (W0 -> W_res): a saved adapter must be converted
    # against the initial one to load onto the pretrained model (pilora.export)
    mutates_base: bool = False
    adapter: bool = True  # False: full fine-tuning, no PEFT wrapper, every backbone weight trains
    matchable: bool = False  # match_budget=true trains it at a PiLoRA run's adapter budget
    own_forward: str | None = None  # the layer has its own forward (DoRA): fused_forward=true is refused
    # parameter-name parts of its trainable adapter tensors: pilora.params counts them as the
    # paper's "# Params" (a method whose tensors are not named here would count 0)
    adapter_keys: tuple[str, ...] = ("lora_A", "lora_B")
    rows: tuple[tuple[str, str], ...] = ()  # (row name, table name) of its rows in records and tables
    record_key: str | None = None  # the record section it fills (None in other methods' records)
    name: str = ""  # set by register_method

    # ------------------------------------------------------------------------------ config
    def runs_stage1(self, cfg: "MethodConfig | dict") -> bool:
        """Whether a job of ``cfg`` (typed, or the config's ``method`` section) runs PiLoRA's stage 1
        (its own, or a budget match's)."""
        match = cfg.get("match_budget") if isinstance(cfg, Mapping) else cfg.match_budget
        return self.two_stage or (self.matchable and bool(match))

    def check(self, cfg: "MethodConfig") -> None:
        """Raise a ValueError for a combination of values this method cannot run."""
        if cfg.fused_forward and self.own_forward:
            raise ValueError(
                f"fused_forward applies to plain LoRA layers; {self.own_forward} has its own forward "
                "(set method.fused_forward=null)"
            )
        if self.runs_stage1(cfg):
            from .pilora import check_partition

            check_partition(cfg)

    def job_config(self, cfg: "MethodConfig", task) -> "MethodConfig":
        """The config of one job on ``task``: the task's head trains in full unless the config names
        ``modules_to_save``."""
        if cfg.modules_to_save is None and getattr(task, "head_modules", None):
            return replace(cfg, modules_to_save=HeadModules(task.head_modules))
        return cfg

    # ------------------------------------------------------------------------- before training
    def before_training(self, cfg: "MethodConfig", job: JobContext) -> Plan:
        """Everything before the training run; a matchable method with ``match_budget`` copies a
        PiLoRA run's budget (:func:`pilora.methods.budget.match`)."""
        if self.matchable and cfg.match_budget:
            from .budget import match

            return match(cfg, job)
        return Plan(cfg, title=cfg.name)

    # --------------------------------------------------------------------------------- model
    def peft_config(
        self, cfg: "MethodConfig", task_type: str | None = None, r: int | None = None, alpha: float | None = None
    ):
        """The PEFT ``LoraConfig`` of ``cfg`` (for PiLoRA: of its plain-LoRA stages)."""
        from peft import LoraConfig

        kwargs = dict(
            r=int(r or cfg.r),
            lora_alpha=float(cfg.alpha if alpha is None else alpha),
            lora_dropout=float(cfg.dropout),
            target_modules=list(cfg.target_modules) if not isinstance(cfg.target_modules, str) else cfg.target_modules,
            modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
            task_type=task_type,
            rank_pattern=dict(cfg.rank_pattern or {}),
            alpha_pattern=dict(cfg.alpha_pattern or {}),
        )
        kwargs.update(self.lora_kwargs)
        return LoraConfig(**kwargs)

    def rank(self, cfg: "MethodConfig", masks: dict | None, stage: int | None) -> int:
        """The rank PEFT injects: ``stage1_r`` for PiLoRA's stage 1 (also a budget match's), else ``r``."""
        return int(cfg.stage1_r) if stage == 1 and cfg.stage1_r else int(cfg.r)

    def alpha(self, cfg: "MethodConfig", masks: dict | None, stage: int | None) -> float:
        """α of the injected LoRA. A stage 1 at its own rank keeps the job's scale s = α/r, so Fig. 5's
        stage 1 (stage1_r = 32 for every dominant r) is Tab. 5's r = 32, α = 64 LoRA at each point,
        and every point gets the same partition."""
        return float(cfg.alpha) * self.rank(cfg, masks, stage) / int(cfg.r)

    def build(self, model: "nn.Module", cfg: "MethodConfig", *, masks=None, stage=None, task_type=None):
        """Wrap ``model`` (pretrained, frozen) with this method's adapters."""
        from peft import get_peft_model

        from ..layer import FusedLoraForward

        check_modules_to_save(model, cfg.modules_to_save)
        check_target_modules(model, cfg.target_modules, heads=cfg.modules_to_save)
        peft_config = self.peft_config(
            cfg, task_type, r=self.rank(cfg, masks, stage), alpha=self.alpha(cfg, masks, stage)
        )
        peft_model = get_peft_model(model, peft_config)
        init = INITS[self.init]
        for layer in lora_layers(peft_model).values():
            init(layer, "default", cfg)
        self.after_injection(peft_model, cfg, masks, stage)
        if cfg.fused_forward is not None:  # None keeps each layer's default: PiLoRA fused, PEFT's layers stock
            for layer in lora_layers(peft_model).values():
                if cfg.fused_forward:
                    layer.lora_variant["default"] = FusedLoraForward()
                elif isinstance(layer.lora_variant.get("default"), FusedLoraForward):
                    del layer.lora_variant["default"]  # PEFT's own forward, e.g. to time PiLoRA unfused
        return peft_model

    def after_injection(self, peft_model, cfg: "MethodConfig", masks: dict | None, stage: int | None) -> None:
        """Change the injected, initialised PEFT model (PiLoRA: its stage-2 layers)."""

    def on_built(self, model, plan: Plan, job: JobContext) -> None:
        """After the model of the training run is built: a method whose init changes W0 keeps the
        initial adapter, to save a loadable one later (pilora.export)."""
        if self.mutates_base and job.main:
            import os

            from ..export import INITIAL_ADAPTER_DIR, save_initial_adapter

            save_initial_adapter(model, os.path.join(job.out, INITIAL_ADAPTER_DIR))

    # ------------------------------------------------------------------------------ training
    def callbacks(self, model, plan: Plan, job: JobContext) -> list:
        """The trainer callbacks of the training run (kept in ``plan.callbacks`` for the record)."""
        return []

    def check_training(self, args, model) -> None:
        """Raise before the Trainer is built for ``TrainingArguments`` this method cannot train with."""

    def save(self, trainer, model, out: str, *, main: bool, sharded: bool) -> None:
        """Save the trained weights into ``out``: ``adapter/`` (stock PEFT; PiLoRA also ``adapter_pilora/``)."""
        if main:
            from ..export import write_adapters

            write_adapters(model, out)

    def record(self, plan: Plan) -> dict:
        """The record sections: every method's section (:func:`record_sections`), None unless filled."""
        return {**{k: None for k in record_sections()}, **plan.sections}


def record_sections() -> tuple[str, ...]:
    """The record sections of all registered methods (every record holds all of them)."""
    out: list[str] = []
    for method in METHODS.values():
        for section in (("budget_match",) if method.matchable else ()) + (
            (method.record_key,) if method.record_key else ()
        ):
            if section not in out:
                out.append(section)
    return tuple(out)


def table_rows() -> dict[str, str]:
    """``{row name: table name}`` of every registered method's rows (``lora_matched`` included):
    what analysis tables name each row."""
    return {row: title for method in METHODS.values() for row, title in method.rows}


def adapter_keys() -> tuple[str, ...]:
    """Parameter-name parts of every registered method's adapter tensors (:mod:`pilora.params`)."""
    return tuple(dict.fromkeys(k for method in METHODS.values() for k in method.adapter_keys))


# ----------------------------------------------------------------------------- target modules


class HeadModules(list):
    """``method.modules_to_save`` as :meth:`Method.job_config` derives it: the task's head
    (``model.head_modules``, else the family's ``[classifier]``), not names the config gave. A list
    like any other (PEFT, records and JSON see a list); its type only lets an error name the key
    the names came from, which the job's typed config no longer says."""


def _heads_key(heads) -> str:
    """The config key that named the modules trained in full."""
    return "model.head_modules" if isinstance(heads, HeadModules) else "method.modules_to_save"


def linear_module_names(model: "nn.Module") -> list[str]:
    """Distinct leaf names of the ``nn.Linear`` layers in ``model`` (candidates for targets)."""
    from torch import nn

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})


def _has_module(names: list[str], target: str) -> bool:
    """PEFT's rule for a listed name: a module's whole dotted name, or the end of one."""
    return any(n == target or n.endswith("." + target) for n in names)


def check_modules_to_save(model: "nn.Module", names) -> None:
    """Raise when a name of ``method.modules_to_save`` (or of ``model.head_modules``, when they
    are the task's head: :class:`HeadModules`) is no module of ``model``: PEFT skips it without a
    word, and the head (``[clasifier]``) would stay frozen at its random init."""
    if not names:
        return
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not _has_module(modules, t)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
        fix = (
            "set model.head_modules to the names of the task's head"
            if isinstance(names, HeadModules)
            else "the task's head: method.modules_to_save=null"
        )
        raise ValueError(
            f"{_heads_key(names)} names {missing}, which {type(model).__name__} does not contain; "
            f"its modules are named {leaves} ({fix})"
        )


def _in_heads(model: "nn.Module", heads) -> Callable[[str], bool]:
    """Whether a module (by whole name) is, or lies inside, a module that ``heads`` names."""
    roots = [n for n, _ in model.named_modules() if n and any(_has_module([n], h) for h in heads or ())]
    return lambda name: any(name == r or name.startswith(r + ".") for r in roots)


def check_target_modules(model: "nn.Module", targets: list[str] | str, heads=None) -> None:
    """Raise, listing the linear layers that exist, when the targets match nothing: a name of the
    list that no linear layer ends with, a string (PEFT's regex) that matches no module, or no
    targets at all. PEFT's own errors for these name neither the model's layers nor the fix.

    ``heads`` (``modules_to_save``: the task's head) train in full, and PEFT gives no adapter to a
    layer inside them: a target found only there is refused (PEFT either skips it without a word
    or, when nothing else is targeted, fails with NoMatchingPeftModuleError), and the layers the
    errors suggest are the backbone's only (``[classifier,dense]`` would lead to that refusal)."""
    import re

    from torch import nn

    in_head = _in_heads(model, heads)
    modules = [n for n, _ in model.named_modules() if n]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not in_head(n)]
    layers = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f"method.target_modules=[{','.join(layers[:2])}]"

    def head_only(found) -> ValueError:
        return ValueError(
            f"target modules {found} are in the task's head {list(heads)} ({_heads_key(heads)}): the head "
            "trains in full (PEFT's modules_to_save), so its layers take no adapter. Target the backbone's "
            f"linear layers, e.g. {example} (of {layers}), or set method.target_modules=null for the model's own"
        )

    if not (targets.strip() if isinstance(targets, str) else targets):
        raise ValueError(
            f"target modules is an empty {'string' if isinstance(targets, str) else 'list'}: no layer would be "
            f"adapted. Name the layers to adapt, e.g. {example} (of {layers}), or set "
            "method.target_modules=null for the model's own"
        )
    if isinstance(targets, str):
        if targets.strip().lower() == "all-linear":
            return  # PEFT's shorthand: it finds the linear layers itself
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"target modules {targets!r} is not a valid regular expression ({err}); give names as a list "
                f"instead, e.g. {example} (of {layers})"
            ) from None
        # PEFT matches a string against each module's whole dotted name (re.fullmatch), whatever its type
        matched = [n for n in modules if pattern.fullmatch(n)]
        if matched and all(in_head(n) for n in matched):
            raise head_only(targets)
        if not matched:
            fix = (
                f"to match it by name, give it as a list: method.target_modules=[{targets}]"
                if _has_module(names, targets)
                else f"name layers that exist as a list ({example}) or write a regex of whole names "
                f"('.*\\.({'|'.join(layers[:2])})')"
            )
            raise ValueError(
                f"target modules {targets!r} match no linear layer of {type(model).__name__}; its linear layers "
                f"are named {layers}. A string is a regex that must match a module's whole name (such as "
                f"{names[0] if names else ''!r}): {fix}"
            )
        return
    heads_part = [n for n in modules if in_head(n)]
    missing = [t for t in targets if not _has_module(names, t) and not _has_module(heads_part, t)]
    if missing:
        raise ValueError(
            f"target modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {layers}"
        )
    in_the_head = [t for t in targets if not _has_module(names, t)]
    if in_the_head:
        raise head_only(in_the_head)
