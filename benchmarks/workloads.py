"""What the benchmarks run: the benchmark setting, the workloads (7B-shaped layers, a small LLaMA),
and one method's model and optimizer on a workload (a :class:`Variant`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pilora.paper_params import model_targets

R, R_S, DOMINANT_FRACTION, K_DEFAULT, DROPOUT, CHUNK_ROWS = 32, 2, 0.4, 10, 0.05, 1024
BASELINE = "lora"
TRAIN_METHODS = ("lora", "lora_fused", "pilora", "dora", "stage1_k10", "stage1_k1")
LIKE_FOR_LIKE = "lora_fused"  # LoRA with PiLoRA's fused addmm forward: separates method cost from implementation
# opt-in controls (not in the default run): LoRA with the fused forward at rank r + r', i.e. every adapter GEMM
# as wide as PiLoRA's, so PiLoRA ÷ lora_wide is the host work PiLoRA adds and lora_wide ÷ lora_fused the width
OPTIONAL_METHODS = ("lora_wide",)
ALL_METHODS = TRAIN_METHODS + OPTIONAL_METHODS
# (in_features, out_features) of the LLaMA-7B linear layers
# the optimizer of a step, by its trainer.optim name: conf/trainer's default (adamw_torch: for-each
# on a GPU, a per-tensor loop on a CPU) and the fused kernel (transformers' own default)
OPTIMIZERS = {"adamw_torch": {}, "adamw_torch_fused": {"fused": True}}
DEFAULT_OPTIM = "adamw_torch"
LAYERS_7B = {"layer_q": (4096, 4096), "layer_up": (4096, 11008), "layer_down": (11008, 4096)}
LAYERS_QUICK = {"layer_q": (512, 512), "layer_up": (512, 1376), "layer_down": (1376, 512)}
LLAMA_SMALL = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=4096,
)
LLAMA_QUICK = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
)
# host_stack: as many adapted modules as the ~1B LLaMA of gpu_llama (16 layers × q k v up down), each
# tiny, on 8 tokens: the compute is negligible and a step's time is its host work per module, the
# regime a GPU step at 1-4 k tokens is in (it waits for Python and kernel launches, not for FLOPs)
HOST_STACK = dict(modules=80, width=64, tokens=8)
LLAMA_TARGETS = model_targets("llama2-7b")  # conf/model: the targets every LLaMA run adapts


class SingleLinear(nn.Module):
    """One linear layer named ``proj`` (the target), so PEFT wraps exactly it."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        out_features, in_features = weight.shape
        self.proj = nn.Linear(in_features, out_features, bias=False, device="meta")
        self.proj.weight = weight

    def forward(self, x):
        return self.proj(x)


class LinearStack(nn.Module):
    """``modules`` equal linear layers in a chain, each named ``proj`` inside its own block."""

    def __init__(self, modules: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(SingleLinear(nn.Parameter(torch.empty(width, width))) for _ in range(modules))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class LayerSet(nn.Module):
    """Several ``SingleLinear`` under their workload names (``layer_q.proj``, ...)."""

    def __init__(self, weights: dict[str, nn.Parameter]):
        super().__init__()
        self.layers = nn.ModuleDict({k: SingleLinear(w) for k, w in weights.items()})


@dataclass
class Workload:
    name: str
    kind: str  # "layer" | "model"
    make_base: Callable[[bool], nn.Module]  # make_base(copy_weights) -> a fresh base model
    targets: list[str]
    forward_backward: Callable[[nn.Module], None]
    forward: Callable[[nn.Module], torch.Tensor]
    inputs: list[torch.Tensor]  # the batch (counted in every variant's static bytes)
    steps_per_sample: int = 1
    meta: dict = field(default_factory=dict)
    reference: nn.Module | None = None  # the shared base, to read shapes from (not trained)


def layer_workload(
    name: str, in_features: int, out_features: int, tokens: int, dtype, device, seed: int = 0
) -> Workload:
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(
        (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(device=device, dtype=dtype),
        requires_grad=False,
    )
    x = torch.randn(tokens, in_features, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(tokens, out_features, generator=g).to(device=device, dtype=dtype)

    def make_base(copy_weights: bool = False) -> nn.Module:
        w = nn.Parameter(weight.detach().clone(), requires_grad=False) if copy_weights else weight
        return SingleLinear(w).train()

    def forward_backward(model):
        x.grad = None
        model(x).backward(grad_out)

    def forward(model):
        return model(x)

    return Workload(
        name,
        "layer",
        make_base,
        ["proj"],
        forward_backward,
        forward,
        [x, grad_out],
        1,
        {
            "in_features": in_features,
            "out_features": out_features,
            "tokens": tokens,
            "dtype": str(dtype).replace("torch.", ""),
        },
        SingleLinear(weight),
    )


def llama_workload(
    name: str,
    config: dict,
    batch: int,
    seq: int,
    dtype,
    device,
    seed: int = 0,
    steps_per_sample: int = K_DEFAULT,
    targets=LLAMA_TARGETS,
) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, max_position_embeddings=max(seq, 128), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        base0 = LlamaForCausalLM(cfg)
    base0.to(dtype).requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + 1)).to(device)

    def make_base(copy_weights: bool = True) -> nn.Module:
        return copy.deepcopy(base0).train()

    def forward_backward(model):
        model(input_ids=ids, labels=ids).loss.backward()

    def forward(model):
        return model(input_ids=ids).logits

    n_params = sum(p.numel() for p in base0.parameters())
    return Workload(
        name,
        "model",
        make_base,
        list(targets),
        forward_backward,
        forward,
        [ids],
        steps_per_sample,
        {
            **config,
            "batch": batch,
            "seq": seq,
            "tokens": batch * seq,
            "base_params": n_params,
            "dtype": str(dtype).replace("torch.", ""),
        },
        base0,
    )


def stack_workload(
    name: str, modules: int, width: int, tokens: int, dtype, device, seed: int = 0, steps_per_sample: int = K_DEFAULT
) -> Workload:
    """``host_stack``: a chain of ``modules`` tiny ``width × width`` layers, all adapted, on ``tokens``
    tokens; loss = the output's sum. Timed in windows of K = 10 steps like the models."""
    torch.manual_seed(seed)
    base0 = LinearStack(modules, width)
    for block in base0.blocks:
        nn.init.normal_(block.proj.weight, std=width**-0.5)
    base0.to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)

    def make_base(copy_weights: bool = True) -> nn.Module:
        return copy.deepcopy(base0).train()

    def forward_backward(model):
        model(x).float().sum().backward()

    meta = {"modules": modules, "width": width, "tokens": tokens, "dtype": str(dtype).replace("torch.", "")}
    return Workload(
        name, "model", make_base, ["proj"], forward_backward, lambda m: m(x), [x], steps_per_sample, meta, base0
    )


def sizes(quick: bool, device: str) -> dict:
    """The workload sizes: 7B-shaped layers and llama_small, or the tiny ``--quick`` ones."""
    if quick:
        return {
            "layers": LAYERS_QUICK,
            "tokens": 256,
            "llama": LLAMA_QUICK,
            "batch": 2,
            "seq": 64,
            "importance_layers": LAYERS_QUICK,
        }
    # the whole small model: 2 × 128 tokens on a CPU (its K=10-step windows dominate the run time),
    # 8 × 256 = 2048 tokens on a GPU
    batch, seq = (8, 256) if str(device).startswith("cuda") else (2, 128)
    return {
        "layers": LAYERS_7B,
        "tokens": 2048,
        "llama": LLAMA_SMALL,
        "batch": batch,
        "seq": seq,
        "importance_layers": LAYERS_7B,
    }


def named_workload(name: str, sz: dict, dtype, device) -> Workload | None:
    """The workload ``name`` (a layer of ``sz["layers"]``, ``llama_small`` or ``host_stack``) at the sizes
    ``sz``; None if unknown."""
    if name in sz["layers"]:
        i, o = sz["layers"][name]
        return layer_workload(name, i, o, sz["tokens"], dtype, device)
    if name == "llama_small":
        return llama_workload(name, sz["llama"], sz["batch"], sz["seq"], dtype, device)
    if name == "host_stack":
        return stack_workload(name, **HOST_STACK, dtype=dtype, device=device)
    return None


def method_config(method: str, targets: list[str], r: int = R, r_s: int = R_S):
    from pilora import MethodConfig

    common = dict(r=r, alpha=2 * r, dropout=DROPOUT, target_modules=list(targets))
    if method == "lora":
        return MethodConfig(name="lora", **common)
    if method == LIKE_FOR_LIKE:
        return MethodConfig(name="lora", fused_forward=True, **common)
    if method == "lora_wide":  # same scaling α/r as the others; only the width changes
        return MethodConfig(name="lora", fused_forward=True, **{**common, "r": r + r_s})
    if method == "dora":
        return MethodConfig(name="dora", **common)
    if method == "pilora" or method.startswith("stage1") or method == "importance_check":
        return MethodConfig(name="pilora", supplementary_r=r_s, chunk_rows=CHUNK_ROWS, **common)
    raise ValueError(f"unknown benchmark method {method!r}")


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    }


def random_masks(
    base: nn.Module, targets: list[str], fraction: float = DOMINANT_FRACTION, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random dominant mask with exactly ``fraction · m`` rows per target layer (as the partitions count)."""
    from pilora.partition import rows_of

    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, lin in target_linears(base, targets).items():
        m = lin.out_features
        mask = torch.zeros(m, dtype=torch.bool)
        mask[torch.randperm(m, generator=g)[: rows_of(fraction, m)]] = True
        masks[name] = mask
    return masks


def make_optimizer(model: nn.Module, optim: str = DEFAULT_OPTIM, lr: float = 1e-4) -> torch.optim.Optimizer:
    if optim not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}; choose from {', '.join(OPTIMIZERS)}")
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **OPTIMIZERS[optim])


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    workload: Workload
    accumulator: object = None
    grad_mask: object = None  # PiLoRA: the StepGradientMask its trainer calls between backward and step

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.workload.forward_backward(self.model)
        if self.grad_mask:
            self.grad_mask()
        self.optimizer.step()

    def use_layer_product(self) -> None:
        """PiLoRA's layers on their own (``blocks ⊙ P`` in every forward, no mask to call), as
        outside pilora's Trainer."""
        self.grad_mask.remove()
        self.grad_mask = None

    def adapter_params(self) -> int:
        """Trainable parameters as the paper counts them (PiLoRA: Eq. 10, without structural zeros)."""
        from pilora.params import count_parameters

        return count_parameters(self.model).trainable

    def stored_params(self) -> int:
        """Numbers the optimizer holds (PiLoRA: its m × (r + r') B, structural zeros included)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build_variant(
    method: str,
    wl: Workload,
    masks: dict | None = None,
    lr: float = 1e-4,
    compile_backend: str | None = None,
    optim: str = DEFAULT_OPTIM,
) -> Variant:
    """One method's model and AdamW (``optim``: a key of ``OPTIMIZERS``); ``compile_backend`` wraps
    the model in ``torch.compile``."""
    from pilora import ImportanceAccumulator, prepare_model
    from pilora.layer import StepGradientMask

    base = wl.make_base(False)
    cfg = method_config(method, wl.targets)
    grad_mask = None
    if method == "pilora":
        model = prepare_model(base, cfg, masks=masks if masks is not None else random_masks(base, wl.targets))
        grad_mask = StepGradientMask(model)  # as pilora's Trainer trains stage 2
    elif method.startswith("stage1"):
        model = prepare_model(base, cfg, stage=1)
    else:
        model = prepare_model(base, cfg)
    model.train()
    opt = make_optimizer(model, optim, lr)
    acc = None
    if method.startswith("stage1"):
        k = int(method.rsplit("_k", 1)[1])
        acc = ImportanceAccumulator(model, interval=k, chunk_rows=CHUNK_ROWS, snapshot_interval=cfg.snapshot_interval)
        acc.attach(opt)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    return Variant(method, model, opt, wl, acc, grad_mask)
