"""Methods and initialisations: pretrained model + method config -> the model to train.

Every method is a PEFT LoRA plus (a) extra ``LoraConfig`` fields and (b) a named init applied to
each LoRA layer after injection. Both are registries: adding a method is one entry here and one
YAML file in ``conf/method/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..peft_layers import lora_layers

# torch is imported where it is used: run.py imports this module (the config schema, the method
# registry) to compose and check a config, which should not wait seconds for torch to load
if TYPE_CHECKING:
    from torch import nn

# -------------------------------------------------------------------------------- method config
# Field types are the ones OmegaConf checks (``typing`` generics, no ``X | Y`` unions): the same
# dataclasses are the schema of ``conf/method/`` (registered at the Hydra edge, ``hydra_setup.py``).
# Numbers that YAML may write as int or float (α = ${mul:${.r},2}) are ``Any``, checked in
# ``__post_init__``, so a record keeps the value as composed.


@dataclass
class Stage1Config:
    """Stage 1 of Alg. 1 (PiLoRA's, or the one a budget-matched LoRA runs to get PiLoRA's partition)."""

    epochs: Any = 1  # the paper's initial phase: 1 epoch (a number of epochs)
    max_steps: int = -1  # > 0: stage 1 lasts this many optimizer steps instead


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
    and listed in the record's ``ignored``)."""

    name: str = "lora"  # key of METHODS
    label: Optional[str] = None  # the row name of records and folders (lora_matched); null: name
    r: int = 8  # LoRA rank; PiLoRA's dominant rank
    alpha: Any = 16.0  # LoRA α (scaling α/r, or α/√r for rsLoRA)
    dropout: float = 0.05  # LoRA dropout probability
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, or a regex string
    modules_to_save: Optional[List[str]] = None  # trained in full (classification heads)
    # adapter added to the base output by one addmm (pilora.layer.FusedLoraForward) instead of
    # PEFT's ``result + B(A(x)) * s``. None: the method's default, on for the PiLoRA layer (ours),
    # off for PEFT's layers (stock LoRA, as in the paper). True on a LoRA method: like-for-like timings.
    fused_forward: Optional[bool] = None
    # PiLoRA (and the stage 1 of a budget-matched LoRA) ------------------------------------------
    supplementary_r: int = 1  # r' of the supplementary adapter; 0 freezes those rows
    supplementary_alpha: Any = None  # None: both groups share s = α/r
    stage1_r: Optional[int] = None  # rank of the stage-1 LoRA (default: r)
    importance_interval: int = 10  # K: optimizer steps between importance checks
    importance_checks: Optional[int] = None  # N: set K from stage 1's length so that T ≈ N checks run
    chunk_rows: int = 1024  # G̃ is formed in blocks of chunk_rows × (widest n) elements (memory bound)
    snapshot_interval: int = 10  # pool the heat-map snapshot on every k-th importance check
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    importance_from: Optional[str] = None  # an importance.pt to reuse instead of running stage 1
    # budget-matched LoRA: per-module ranks from PiLoRA's partition, as many adapter parameters as PiLoRA
    match_budget: bool = False
    rank_pattern: Optional[Dict[str, Any]] = None  # per-module ranks (set by the budget match)
    # LoRA-Dash only (defaults: the authors' code, t = 100 forward calls, s = 8 directions) ---------
    prelaunch_steps: int = 100  # t: plain-LoRA calls of each layer (or optimizer steps) before the launch
    # what t counts: layer_calls (the authors' FLAG: every forward call, eval and gradient-checkpoint
    # recomputation included) or optimizer_steps (see pilora.methods.lora_dash)
    prelaunch_counts: str = "layer_calls"
    directions: int = 8  # s: task-specific directions (learned coefficients) per layer

    def __post_init__(self):
        if isinstance(self.partition, str):
            self.partition = PartitionConfig(name=self.partition)
        elif isinstance(self.partition, dict):
            self.partition = PartitionConfig(**_known(PartitionConfig, self.partition, "method.partition"))
        if isinstance(self.stage1, dict):
            self.stage1 = Stage1Config(**_known(Stage1Config, self.stage1, "method.stage1"))
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        if int(self.r) <= 0:
            raise ValueError(f"rank r must be a positive integer, got {self.r}")
        for key in ("alpha", "supplementary_alpha"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"method.{key} must be a positive number, got {value!r}")
        if self.name == "pilora":
            if int(self.supplementary_r) < 0 or int(self.supplementary_r) > int(self.r):
                raise ValueError(
                    f"supplementary rank r' must satisfy 0 ≤ r' ≤ r = {self.r}, got {self.supplementary_r}"
                )
        if self.name == "pilora" or self.match_budget:
            from ..partition import PARTITIONS

            if self.partition.name not in PARTITIONS:
                raise ValueError(f"unknown partition {self.partition.name!r}; choose one of {sorted(PARTITIONS)}")
            for key in ("tau", "threshold", "fraction"):
                if key in (self.partition.args or {}):
                    v = float(self.partition.args[key])
                    if not 0 < v <= 1:
                        raise ValueError(f"partition {key} must lie in (0, 1], got {v}")
        if self.importance_checks is not None and int(self.importance_checks) < 1:
            raise ValueError(
                f"method.importance_checks must be a positive number of checks, got "
                f"{self.importance_checks} (null keeps K = method.importance_interval)"
            )
        if self.name == "lora_dash":
            if int(self.directions) <= 0:
                raise ValueError(f"LoRA-Dash needs method.directions ≥ 1, got {self.directions}")
            if int(self.prelaunch_steps) < 0:
                raise ValueError(f"method.prelaunch_steps must be ≥ 0, got {self.prelaunch_steps}")
            if self.prelaunch_counts not in PRELAUNCH_COUNTS:
                raise ValueError(
                    f"method.prelaunch_counts={self.prelaunch_counts!r}; choose one of {list(PRELAUNCH_COUNTS)}"
                )
            if self.fused_forward:
                raise ValueError(
                    "fused_forward applies to plain LoRA layers; LoRA-Dash has its own forward "
                    "(set method.fused_forward=null)"
                )
        if not 0 <= float(self.dropout) < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.fused_forward and METHODS[self.name].lora_kwargs.get("use_dora"):
            raise ValueError(
                "fused_forward applies to plain LoRA layers; DoRA has its own forward (set method.fused_forward=null)"
            )

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
# Keys every method uses; ``OPTIONAL_KEYS`` too, but a record lists them only when set.
BASE_KEYS = ("name", "r", "alpha", "dropout", "target_modules")
OPTIONAL_KEYS = ("label", "modules_to_save", "rank_pattern")
# what stage 1 and its partition read: PiLoRA's, and a budget-matched LoRA's (which runs PiLoRA's stage 1)
STAGE1_KEYS = (
    "supplementary_r",
    "stage1_r",
    "importance_interval",
    "importance_checks",
    "chunk_rows",
    "snapshot_interval",
    "stage1",
    "importance_from",
    "partition",
)


def applicable_keys(name: str, match_budget: bool = False) -> tuple[str, ...]:
    """The keys of :class:`MethodConfig` that method ``name`` uses. A key outside them is ignored:
    it changes neither the job nor its folder name, and the record lists it under ``ignored``."""
    method = METHODS[name]
    keys = BASE_KEYS + method.keys + method.optional_keys + OPTIONAL_KEYS
    if match_budget and method.matchable:
        keys += ("match_budget",) + tuple(k for k in STAGE1_KEYS if k not in keys)
    return keys


def interpretations(cfg: MethodConfig, max_grad_norm: float | None) -> dict[str, str]:
    """Readings of what the paper leaves open, as this run applies them (the record's
    ``pilora.interpretations``; README "Evaluation protocols" lists the same three)."""
    if cfg.supplementary_alpha is None:
        scale = (
            f"the supplementary adapter (rank r' = {cfg.supplementary_r}) is scaled by alpha/r = "
            f"{cfg.alpha}/{cfg.r}, the dominant adapter's s, not alpha/r' (method.supplementary_alpha=null)"
        )
    else:
        scale = (
            f"the supplementary adapter is scaled by method.supplementary_alpha/r' = "
            f"{cfg.supplementary_alpha}/{cfg.supplementary_r}"
        )
    clip = (
        f"after gradient clipping to norm {max_grad_norm} (trainer.max_grad_norm), the gradients the optimizer uses"
        if max_grad_norm and max_grad_norm > 0
        else "without clipping (trainer.max_grad_norm is off)"
    )
    return {
        "supplementary_scale": scale,
        "cumulative_threshold": (
            "Fig. 6's cumulative importance threshold is a share of the hit counts SigmaH: rows sorted by "
            "H (ties by SigmaS), the shortest prefix whose H sums to threshold x SigmaH is dominant"
        ),
        "score_gradients": (
            f"S and SigmaS come from the adapters' gradients {clip}, after accumulation and all-reduce"
        ),
    }


def recorded_section(section: dict) -> dict:
    """The ``method`` section of a record and of a job's identity: the keys the method uses, as
    composed (``target_modules: null`` stays null). Optional keys appear only when set, so a record
    of a method holds the keys of its ``conf/method`` file."""
    name, matched = section.get("name", "lora"), bool(section.get("match_budget"))
    method = METHODS.get(name)
    if method is None:
        return dict(section)
    default = asdict(MethodConfig())
    always = BASE_KEYS + method.keys + (("match_budget",) + STAGE1_KEYS if matched and method.matchable else ())
    keys = applicable_keys(name, matched)
    return {k: v for k, v in section.items() if k in always or (k in keys and v != default.get(k))}


# -------------------------------------------------------------------------------------- registries

INITS: dict[str, Callable[[nn.Module, str], None]] = {}
METHODS: dict[str, "Method"] = {}


def register_init(name: str):
    def deco(fn):
        INITS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class Method:
    """A method = extra ``LoraConfig`` fields + a per-layer init + whether it has two stages.

    ``adapter=False`` is full fine-tuning: no PEFT wrapper, every backbone weight trains.
    """

    lora_kwargs: dict[str, Any]
    init: str = "default"
    two_stage: bool = False
    # the init moves part of W0 into the adapter (W0 -> W_res): a saved adapter must be converted
    # against the initial one to load onto the pretrained model (pilora.export)
    mutates_base: bool = False
    adapter: bool = True
    # the config keys it uses beyond BASE_KEYS: recorded always (``keys``) or only when set
    keys: tuple[str, ...] = ()
    optional_keys: tuple[str, ...] = ()
    matchable: bool = False  # match_budget=true trains it at a PiLoRA run's adapter budget


def register_method(name: str, method: Method) -> None:
    METHODS[name] = method


@register_init("default")
def _default_init(layer, adapter, cfg=None):
    """PEFT's LoRA init (A Kaiming-uniform, B = 0), already applied at injection."""


@register_init("pissa")
def _pissa_init(layer, adapter, cfg=None):
    """PiSSA: principal r singular triplets in the adapter, the rest in W_res (PEFT's code)."""
    layer.pissa_init(adapter, "pissa")


@register_init("milora")
def milora_init(layer, adapter, cfg=None):
    """MiLoRA: the adapter takes the *minor* (smallest) r singular triplets of W0.

    ``W0 = U Σ Vᵀ``; with the last r triplets ``(U_r, Σ_r, V_r)``: ``A = √(Σ_r/s) V_rᵀ``,
    ``B = U_r √(Σ_r/s)`` and ``W_res = W0 − s·B A``, so the output is unchanged at init.
    """
    import torch

    base = layer.get_base_layer()
    W = base.weight
    r, s = int(layer.r[adapter]), float(layer.scaling[adapter])
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("MiLoRA init needs a float base weight (initialise before quantising)")
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    Ur, Sr, Vhr = U[:, -r:], S[-r:] / s, Vh[-r:]
    A = torch.diag(Sr.sqrt()) @ Vhr
    B = Ur @ torch.diag(Sr.sqrt())
    layer.lora_A[adapter].weight.data = A.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = B.to(layer.lora_B[adapter].weight.dtype)
    base.weight.data = (W.float() - s * B @ A).to(W.dtype)


_FUSED = ("fused_forward",)
register_method("lora", Method({}, keys=_FUSED, matchable=True))
register_method("rslora", Method({"use_rslora": True}, keys=_FUSED))
register_method("dora", Method({"use_dora": True}, optional_keys=_FUSED))  # fused_forward=true raises
register_method("pissa", Method({}, init="pissa", mutates_base=True, keys=_FUSED))
register_method("milora", Method({}, init="milora", mutates_base=True, keys=_FUSED))
register_method("pilora", Method({}, two_stage=True, keys=_FUSED + ("supplementary_alpha",) + STAGE1_KEYS))
register_method(
    "lora_dash", Method({}, init="lora_dash", keys=_FUSED + ("prelaunch_steps", "prelaunch_counts", "directions"))
)
register_method("full", Method({}, adapter=False))  # r, α, dropout, targets: kept, unused


@register_init("lora_dash")
def _lora_dash_init(layer, adapter, cfg=None):
    """LoRA-Dash: PEFT's LoRA init plus ``cfg.directions`` zero coefficients; the directions are
    chosen at the launch (:mod:`pilora.methods.lora_dash`), so the output equals the base model's."""
    from .lora_dash import attach_dash

    cfg = cfg if cfg is not None else MethodConfig(name="lora_dash")
    # layer_calls: each layer counts its own forward calls and launches itself (the authors' FLAG)
    calls = int(cfg.prelaunch_steps) if cfg.prelaunch_counts == "layer_calls" else None
    attach_dash(layer, int(cfg.directions), adapter, prelaunch_calls=calls)


def full_finetune(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Full fine-tuning: every weight of the model trains (backbone and task head alike)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- target modules


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the ``nn.Linear`` layers in ``model`` (candidates for targets)."""
    from torch import nn

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})


def check_target_modules(model: nn.Module, targets: list[str] | str) -> None:
    """Raise, listing the linear layers that exist, when a target name matches nothing."""
    if isinstance(targets, str):
        return  # a regex or "all-linear": PEFT validates it
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"target modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {linear_module_names(model)}"
        )


# ------------------------------------------------------------------------------ building models


def lora_config(cfg: MethodConfig, task_type: str | None = None, r: int | None = None):
    """The PEFT ``LoraConfig`` for a method (for PiLoRA: its plain-LoRA stages)."""
    from peft import LoraConfig

    method = METHODS[cfg.name]
    kwargs = dict(
        r=int(r or cfg.r),
        lora_alpha=float(cfg.alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=list(cfg.target_modules) if not isinstance(cfg.target_modules, str) else cfg.target_modules,
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        task_type=task_type,
        rank_pattern=dict(cfg.rank_pattern or {}),
    )
    kwargs.update(method.lora_kwargs)
    return LoraConfig(**kwargs)


def prepare_model(
    model: nn.Module,
    cfg: MethodConfig | dict,
    *,
    masks: dict | None = None,
    stage: int | None = None,
    task_type: str | None = None,
):
    """Wrap ``model`` (pretrained, frozen) with the adapters of ``cfg``.

    For PiLoRA, ``stage=1`` (or ``masks=None``) gives the plain rank-r LoRA of stage 1, and
    ``masks`` (dominant rows per module) gives the stage-2 model of Eq. 10.
    """
    from peft import get_peft_model

    from ..layer import FusedLoraForward, to_pilora

    if isinstance(cfg, dict):
        cfg = MethodConfig.from_dict(cfg)
    method = METHODS[cfg.name]
    if not method.adapter:
        return full_finetune(model, cfg)
    check_target_modules(model, cfg.target_modules)
    r = cfg.stage1_r if (method.two_stage and masks is None and cfg.stage1_r) else cfg.r
    peft_model = get_peft_model(model, lora_config(cfg, task_type, r=r))
    init = INITS[method.init]
    for layer in lora_layers(peft_model).values():
        init(layer, "default", cfg)
    if method.two_stage and masks is not None and stage != 1:
        to_pilora(peft_model, masks, int(cfg.supplementary_r), cfg.supplementary_alpha)  # fused by default
    if cfg.fused_forward is not None:  # None keeps each layer's default: PiLoRA fused, PEFT's layers stock
        for layer in lora_layers(peft_model).values():
            if cfg.fused_forward:
                layer.lora_variant["default"] = FusedLoraForward()
            elif isinstance(layer.lora_variant.get("default"), FusedLoraForward):
                del layer.lora_variant["default"]  # PEFT's own forward, e.g. to time PiLoRA unfused
    return peft_model
