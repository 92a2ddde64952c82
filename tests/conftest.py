import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _no_hydra_config_left_behind():
    """Tests that resolve ``${hydra:...}`` set Hydra's process-wide config; a job started from
    Python later in the same worker would then read those overrides as its sweep point (its W&B run
    name). Each test leaves the singleton as it found it."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = before


class TinyMLP(nn.Module):
    """Two target linears with different shapes, a head that is not a target."""

    def __init__(self, d_in=10, d_hidden=16, d_out=12, n_cls=3):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out)
        self.head = nn.Linear(d_out, n_cls)

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


# LlamaConfig keywords of the small LLaMAs several tests build from a config (exact parameter counts
# in those tests are written for these shapes)
TINY_LLAMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=32,
)
SMALL_LLAMA = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)


def tiny_llama_and_tokenizer():
    """The model of ``conf/model/tiny-llama.yaml`` (randomly initialised with seed 0) and its
    tokenizer, as the runner builds them: tests that need the tiny LLaMA outside a Hydra job use the
    configured one rather than a copy of its shapes."""
    from helpers import CONF
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from pilora.runner.config import register_resolvers
    from pilora.tasks.base import load_pretrained, load_tokenizer

    register_resolvers()
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, "model", "tiny-llama.yaml")), resolve=True)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    return load_pretrained(cfg, AutoModelForCausalLM), tok


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


def train_steps(model, x, y, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt
