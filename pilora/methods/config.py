"""The method config: every key of ``conf/method/*.yaml``, declared once.

Each field of :class:`MethodConfig` carries a :class:`Key` (its help text, its bounds and the
methods that use it). Everything else derives from it: which keys a method uses
(:func:`applicable_keys`) and records (:func:`recorded_section`), the stage-1 keys
(:data:`STAGE1_KEYS`), the integer checks made before anything converts a value
(:func:`integer_bounds`, :mod:`pilora.runner.checks`), the bounds checked here, and the key table
``python -m pilora.methods`` prints (:func:`describe_keys`).

Field types are the ones OmegaConf checks (``typing`` generics, no ``X | Y`` unions): the same
dataclasses are the schema of ``conf/method/`` (registered at the Hydra edge, ``hydra_setup.py``).
Numbers that YAML may write as int or float (α = ${mul:${.r},2}) are ``Any``, checked in
``__post_init__``, so a record keeps the value as composed.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from .base import METHODS

# Who uses a key (``Key.methods``): method names, or one of these groups
ALL = "*"  # every method
ADAPTER = "adapter"  # every method that trains PEFT LoRA layers (not full fine-tuning)
STAGE1 = "stage1"  # every method that runs PiLoRA's stage 1: two-stage ones, and a matchable one with match_budget
MATCHED = "matched"  # a matchable method with match_budget=true (the budget-matched LoRA)
_KEY = "pilora"  # the field metadata entry that holds a Key


@dataclass(frozen=True)
class Key:
    """What one config key is: help text, who uses it, and the values it allows."""

    help: str
    methods: tuple[str, ...] = (ALL,)  # method names or groups (ALL, ADAPTER, STAGE1, MATCHED)
    optional_for: tuple[str, ...] = ()  # methods that use it but record it only when set
    when_set: bool = False  # every method that uses it records it only when set
    symbol: str = ""  # the paper's name (r', K, t, ...), quoted in errors
    integer: bool = False  # an integer (float values that are whole numbers pass)
    number: bool = False  # an int or float (not a bool)
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself is excluded
    open_high: bool = False
    choices: tuple | None = None
    nullable: bool = False  # None allowed (set when the default is None)

    def bounds(self) -> str:
        """The allowed values in words ("a positive integer", "in [0, 1)"), '' when unrestricted."""
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        elif self.integer:
            text = "a positive integer" if self.low == 1 and self.high is None else f"an integer >= {self.low}"
        elif self.low is not None and self.high is not None:
            text = f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"
        elif self.low is not None:
            text = "a positive number" if self.low == 0 and self.open_low else f"a number >= {self.low}"
        else:
            return ""
        return text + (" or null" if self.nullable else "")

    def allows(self, value) -> bool:
        """Whether ``value`` is one of the allowed values (any value when the key has no bounds)."""
        if not self.bounds() or (value is None and self.nullable):
            return True
        if self.choices is not None:
            return value in self.choices
        numeric = not isinstance(value, bool) and isinstance(value, (int, float))
        ok = numeric and (not self.integer or float(value).is_integer())
        if ok and self.low is not None:
            ok = value > self.low if self.open_low else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.open_high else value <= self.high
        return ok

    def check(self, name: str, value) -> None:
        """Raise a ValueError naming ``method.<name>`` when ``value`` is outside the allowed values."""
        if not self.allows(value):
            symbol = f" ({self.symbol})" if self.symbol else ""
            raise ValueError(f"method.{name}{symbol} must be {self.bounds()}, got {value!r}")


def key(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **meta):
    """A :class:`MethodConfig` field with its :class:`Key`."""
    meta.setdefault("nullable", default is None)
    kwargs = {"default": default} if default_factory is MISSING else {"default_factory": default_factory}
    return field(metadata={_KEY: Key(help=help, **meta)}, **kwargs)


def key_of(name: str) -> Key:
    """The :class:`Key` of field ``name`` of :class:`MethodConfig`."""
    return _FIELDS[name].metadata[_KEY]


@dataclass
class Stage1Config:
    """Stage 1 of Alg. 1 (PiLoRA's, or the one a budget-matched LoRA runs to get PiLoRA's partition).

    Its keys are bounded like :class:`MethodConfig`'s: ``epochs`` goes to ``float()`` only when the
    stage-1 ``TrainingArguments`` are built, and ``epochs=0`` (or -1) trained 0 steps before the
    partition failed on T = 0 checks, naming no key."""

    # the paper's initial phase: 1 epoch (a number of epochs; Any: YAML may write it as int or float)
    epochs: Any = key(1, help="stage 1's length in epochs (the paper: 1)", number=True, low=0, open_low=True)
    max_steps: int = key(
        -1, help="> 0: stage 1 lasts this many optimizer steps instead (<= 0: epochs)", integer=True, low=-1
    )

    def __post_init__(self):
        for f in fields(self):
            f.metadata[_KEY].check(f"stage1.{f.name}", getattr(self, f.name))


@dataclass
class PartitionConfig:
    """How stage 1's statistics split each module's rows (``pilora.partition.PARTITIONS``)."""

    name: str = "hit_frequency"  # key of pilora.partition.PARTITIONS
    args: Dict[str, Any] = field(default_factory=dict)  # the strategy's keywords (tau, threshold, fraction, seed)


# What LoRA-Dash's t (method.prelaunch_steps) counts; pilora.methods.lora_dash explains both.
PRELAUNCH_COUNTS = ("layer_calls", "optimizer_steps")


@dataclass
class MethodConfig:
    """One adapter method. Field names are the keys of ``conf/method/*.yaml``; every method accepts
    every key, and :func:`applicable_keys` says which ones a method uses (the others are ignored
    and listed in the record's ``ignored``). The runner never changes a job's config: what a job
    derives (its head modules, a budget match's ranks) is a copy (``dataclasses.replace``)."""

    name: str = key("lora", help="the method (a key of pilora.methods.METHODS)")
    label: Optional[str] = key(
        None, help="the row name of records and folders (lora_matched); null: name", when_set=True
    )
    r: int = key(8, help="LoRA rank; PiLoRA's dominant rank", symbol="rank r", integer=True, low=1)
    alpha: Any = key(16.0, help="LoRA α (scaling α/r, or α/√r for rsLoRA)", symbol="α", low=0, open_low=True)
    dropout: float = key(0.05, help="LoRA dropout probability", low=0, high=1, open_high=True)
    target_modules: Any = key(
        default_factory=lambda: ["q_proj", "v_proj"],
        help="adapted linear layers: names, or a regex string (conf/method: null, the model's target_modules)",
    )
    modules_to_save: Optional[List[str]] = key(
        None, help="trained in full (classification heads; null: the task's head)", when_set=True
    )
    fused_forward: Optional[bool] = key(
        None,
        help="the adapter added to the base output by one addmm (pilora.layer.FusedLoraForward) instead of "
        "PEFT's result + B(A(x))·s. null: the method's default (on for PiLoRA's stage 2, off for PEFT's "
        "layers, as in the paper); true on a LoRA method: like-for-like timings",
        methods=(ADAPTER,),
        optional_for=("dora",),
    )
    # PiLoRA (and the stage 1 of a budget-matched LoRA) ------------------------------------------
    supplementary_r: int = key(
        1,
        help="r' of the supplementary adapter; 0 freezes those rows",
        methods=(STAGE1,),
        symbol="r'",
        integer=True,
        low=0,
    )
    supplementary_alpha: Any = key(
        None,
        help="α of the supplementary adapter; null: both groups share s = α/r",
        methods=("pilora",),
        low=0,
        open_low=True,
        symbol="α'",
    )
    stage1_r: Optional[int] = key(
        None,
        help="rank of the stage-1 LoRA (null: r); its α is α·stage1_r/r, the job's scale s = α/r",
        methods=(STAGE1,),
        integer=True,
        low=1,
    )
    importance_interval: int = key(
        10,
        help="K: optimizer steps between importance checks (not given in the paper)",
        methods=(STAGE1,),
        symbol="K",
        integer=True,
        low=1,
    )
    importance_checks: Optional[int] = key(
        None,
        help="N: K = stage-1 optimizer steps // N, so that T ≈ N checks run (null: K above)",
        methods=(STAGE1,),
        symbol="N",
        integer=True,
        low=1,
    )
    chunk_rows: int = key(
        1024,
        help="G̃ is formed in blocks of chunk_rows rows of the widest module (bounds the importance pass's memory)",
        methods=(STAGE1,),
        integer=True,
        low=1,
    )
    snapshot_interval: int = key(
        10,
        help="pool the |G̃| heat-map snapshot (figures only) on every k-th importance check",
        methods=(STAGE1,),
        integer=True,
        low=1,
    )
    snapshot_window: str = key(
        "crop",
        help="what the heat-map snapshot covers (pilora.importance.SNAPSHOT_WINDOWS): crop, the first "
        "rows x columns, one neuron per row, as the paper's figures | pool, the whole matrix averaged",
        methods=(STAGE1,),
    )
    snapshot_size: Any = key(
        default_factory=lambda: [256, 256],
        help="rows and columns of the heat-map snapshot grid (at most the module's own)",
        methods=(STAGE1,),
    )
    partition: PartitionConfig = key(
        default_factory=PartitionConfig,
        help="how stage 1's statistics split each module's rows (conf/method/partition/)",
        methods=(STAGE1,),
    )
    stage1: Stage1Config = key(
        default_factory=Stage1Config,
        help="stage 1's length: epochs (the paper: 1), or max_steps > 0",
        methods=(STAGE1,),
    )
    importance_from: Optional[str] = key(
        None, help="an importance.pt to reuse instead of running stage 1", methods=(STAGE1,)
    )
    # budget-matched LoRA ------------------------------------------------------------------------
    match_budget: bool = key(
        False,
        help="per-module ranks from PiLoRA's partition: as many adapter parameters as PiLoRA",
        methods=(MATCHED,),
    )
    rank_pattern: Optional[Dict[str, Any]] = key(
        None, help="per-module ranks (PEFT rank_pattern; a budget-matched job derives its own)", when_set=True
    )
    alpha_pattern: Optional[Dict[str, Any]] = key(
        None,
        help="per-module α (PEFT alpha_pattern; a budget-matched job sets α·k/r: each rank k keeps s = α/r)",
        when_set=True,
    )
    # LoRA-Dash (defaults: the authors' code, t = 100 forward calls, s = 8 directions) -----------
    prelaunch_steps: int = key(
        100,
        help="t: plain-LoRA calls of each layer (or optimizer steps) before the launch",
        methods=("lora_dash",),
        symbol="t",
        integer=True,
        low=0,
    )
    prelaunch_counts: str = key(
        "layer_calls",
        help="what t counts: layer_calls (the authors' FLAG: every forward call, eval and "
        "gradient-checkpoint recomputation included) or optimizer_steps (see pilora.methods.lora_dash)",
        methods=("lora_dash",),
        choices=PRELAUNCH_COUNTS,
    )
    directions: int = key(
        8,
        help="s: task-specific directions (learned coefficients) per layer, <= min(m, n) of every target W",
        methods=("lora_dash",),
        symbol="s",
        integer=True,
        low=1,
    )

    def __post_init__(self):
        if isinstance(self.partition, str):
            self.partition = PartitionConfig(name=self.partition)
        elif isinstance(self.partition, dict):
            self.partition = PartitionConfig(**_known(PartitionConfig, self.partition, "method.partition"))
        if isinstance(self.stage1, dict):
            self.stage1 = Stage1Config(**_known(Stage1Config, self.stage1, "method.stage1"))
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        for f in fields(self):  # a value outside its key's bounds is refused, whichever method
            f.metadata[_KEY].check(f.name, getattr(self, f.name))
        METHODS[self.name].check(self)  # what only the method knows (r' <= r, its own forward)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        """The config of a ``method`` mapping; a key that is no field raises, listing the valid ones."""
        return cls(**_known(cls, d, "method"))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def row_name(self) -> str:
        """How records, tables and folders name this method (``label``, else ``name``)."""
        return self.label or self.name

    def ignored(self) -> dict:
        """Keys set to a non-default value that this method does not use, with their values."""
        keys = applicable_keys(self.name, self.match_budget)
        default = {**asdict(MethodConfig()), "partition": DEFAULT_PARTITION}
        mine = asdict(self)
        return {k: mine[k] for k in mine if k not in keys and mine[k] != default[k]}


_FIELDS = {f.name: f for f in fields(MethodConfig)}


def _known(cls, d: dict, where: str) -> dict:
    valid = list(cls.__dataclass_fields__)
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; valid keys of {where}: {', '.join(valid)}"
        )
    return dict(d)


# the partition conf/method/_base.yaml gives every method (the schema's args stay empty, so that a
# chosen partition's args replace them instead of merging into them)
DEFAULT_PARTITION = {"name": "hit_frequency", "args": {"tau": 0.5}}
# what stage 1 and its partition read: PiLoRA's, and a budget-matched LoRA's (which runs PiLoRA's stage 1)
STAGE1_KEYS = tuple(name for name, f in _FIELDS.items() if STAGE1 in f.metadata[_KEY].methods)


def _uses(k: Key, name: str, match_budget: bool) -> bool:
    method = METHODS[name]
    matched = bool(match_budget) and method.matchable
    groups = {ALL: True, ADAPTER: method.adapter, STAGE1: method.two_stage or matched, MATCHED: matched}
    return name in k.optional_for or any(groups.get(who, who == name) for who in k.methods)


def applicable_keys(name: str, match_budget: bool = False) -> tuple[str, ...]:
    """The keys of :class:`MethodConfig` that method ``name`` uses. A key outside them is ignored:
    it changes neither the job nor its folder name, and the record lists it under ``ignored``."""
    return tuple(n for n, f in _FIELDS.items() if _uses(f.metadata[_KEY], name, match_budget))


def always_recorded_keys(name: str, match_budget: bool = False) -> tuple[str, ...]:
    """The keys a record of method ``name`` holds whatever their value (the others it uses: when set)."""
    return tuple(
        n for n in applicable_keys(name, match_budget) if not key_of(n).when_set and name not in key_of(n).optional_for
    )


def integer_bounds() -> tuple[tuple[str, int], ...]:
    """``(key, smallest value)`` of every integer key, checked on the composed config before anything
    converts a value (PEFT truncates ``r=2.5`` to 2 while the record would say 2.5)."""
    return tuple((n, int(f.metadata[_KEY].low)) for n, f in _FIELDS.items() if f.metadata[_KEY].integer)


def recorded_section(section: dict) -> dict:
    """The ``method`` section of a record and of a job's identity: the keys the method uses, as
    composed (``target_modules: null`` stays null). Keys recorded only when set appear only when
    they differ from the default, so a record of a method holds the keys of its ``conf/method`` file."""
    name, matched = section.get("name", "lora"), bool(section.get("match_budget"))
    if name not in METHODS:
        return dict(section)
    default = asdict(MethodConfig())
    always, keys = always_recorded_keys(name, matched), applicable_keys(name, matched)
    return {k: v for k, v in section.items() if k in always or (k in keys and v != default.get(k))}


def describe_keys(name: str | None = None) -> str:
    """The key table: every key (or those method ``name`` uses) with its default, its allowed values,
    the methods that use it and its help text."""
    lines = []
    for n, f in _FIELDS.items():
        k = f.metadata[_KEY]
        if name is not None and n not in applicable_keys(name, match_budget=METHODS[name].matchable):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        # a key only a budget-matched run reads (conf/method/lora_matched.yaml) is not one plain LoRA uses
        users = ", ".join(
            m if n in applicable_keys(m) else f"{m} with method.match_budget=true"
            for m in sorted(METHODS)
            if n in applicable_keys(m, match_budget=True)
        )
        bounds = f"; {k.bounds()}" if k.bounds() else ""
        lines.append(f"method.{n} (default {default!r}{bounds}; used by {users})\n    {k.help}")
    return "\n".join(lines)
