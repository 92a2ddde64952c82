"""Commonsense reasoning with a causal LM (the LLM-Adapters / DoRA protocol)."""

from __future__ import annotations

import contextlib
import os

from . import llm_adapters as cs
from .base import DataError, Task, load_pretrained, load_tokenizer, register_family, require_columns


@register_family("generation")
class CommonsenseTask(Task):
    """Train on Commonsense170K-style json, validate on a held-out slice (loss), and score the
    eight test sets by generation (4-beam search by default) + regex answer extraction."""

    model_families = ("causal_lm",)
    example_model = "llama2-7b"
    task_type = "CAUSAL_LM"
    accepts_loss_kwargs = None  # HF causal LMs average the token loss over num_items_in_batch

    def __init__(self, task_cfg, model_cfg, seed=0):
        super().__init__(task_cfg, model_cfg, seed)
        self.tokenizer = load_tokenizer(model_cfg)
        if self.tokenizer.pad_token is None:
            # LLaMA tokenizers have no pad token; LLM-Adapters pads with id 0 (unk)
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        if self.tokenizer.eos_token is None:
            raise DataError(
                f"tokenizer {model_cfg.get('tokenizer') or model_cfg.get('path')!r} has no EOS "
                "token; the commonsense protocol appends EOS to every example"
            )

    def build_model(self):
        from transformers import AutoModelForCausalLM

        model = load_pretrained(self.model_cfg, AutoModelForCausalLM)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def datasets(self):
        train_file = self.cfg["dataset"]["train_file"]
        if not os.path.exists(os.path.expanduser(train_file)):
            raise DataError(
                f"training file {train_file!r} not found; download LLM-Adapters' "
                "ft-training_set/commonsense_170k.json and set task.dataset.train_file"
            )
        ds = cs.load_commonsense_split(train_file)
        require_columns(ds, ["instruction", "output"], self.name)
        n_val = int(self.cfg.get("val_set_size", 120))
        if len(ds) <= n_val:
            raise DataError(f"{train_file!r} has {len(ds)} examples, not more than val_set_size={n_val}")
        # finetune.py splits with seed 42 whatever the run's seed, so every run validates on the same 120
        split = ds.train_test_split(test_size=n_val, shuffle=True, seed=int(self.cfg.get("val_split_seed", 42)))
        tok = lambda ex: cs.tokenize_for_training(  # noqa: E731
            ex,
            self.tokenizer,
            cutoff_len=int(self.cfg.get("cutoff_len", 256)),
            train_on_inputs=bool(self.cfg.get("train_on_inputs", True)),
            style=self.prompt_style,
        )
        cols = split["train"].column_names
        return {
            "train": split["train"].map(tok, remove_columns=cols, desc="tokenize train"),
            "validation": split["test"].map(tok, remove_columns=cols, desc="tokenize validation"),
            "test": None,
        }

    def collator(self):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)

    @property
    def prompt_style(self) -> str:
        style = self.cfg.get("prompt_style", cs.DEFAULT_PROMPT_STYLE)
        if style not in cs.PROMPT_STYLES:
            raise ValueError(
                f"task.prompt_style={style!r} is not a prompt style; choose one of {sorted(cs.PROMPT_STYLES)}"
            )
        return style

    @property
    def generation(self) -> dict:
        """Decoding settings: the reference's, overridden by ``task.generation.*``."""
        from transformers import GenerationConfig

        settings = {**cs.REFERENCE_GENERATION, **(self.cfg.get("generation") or {})}
        known = GenerationConfig().to_dict()
        unknown = sorted(k for k in settings if k not in known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(known), n=3)
            raise ValueError(
                f"task.generation.{unknown[0]} is not a transformers.GenerationConfig setting"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
            )
        return settings

    @property
    def eval_weights(self) -> str:
        mode = self.cfg.get("eval_weights", "unmerged")
        if mode not in EVAL_WEIGHTS:
            raise ValueError(
                f"task.eval_weights={mode!r} is not an evaluation mode; choose one of {sorted(EVAL_WEIGHTS)}"
            )
        return mode

    def protocol(self) -> dict:
        return {
            "reported_split": "test",
            "reference": "LLM-Adapters commonsense_evaluate.py",
            "prompt_style": self.prompt_style,
            "generation": self.generation,
            "eval_weights": self.eval_weights,
            "best_epoch_on": "validation (held-out training examples)",
        }

    def final_metrics(self, model, trainer, data):
        """Accuracy on each configured test set by generation, and Avg."""
        sets = {name: path for name, path in (self.cfg.get("eval_sets") or {}).items() if path}
        limit = self.cfg.get("eval_limit")
        generation, style = self.generation, self.prompt_style  # bad settings fail before any work
        out = {}
        with EVAL_WEIGHTS[self.eval_weights](self, model) as scored:
            for name, path in sets.items():
                examples = cs.load_commonsense_split(path)
                if limit:
                    examples = examples.select(range(min(int(limit), len(examples))))
                res = cs.evaluate_dataset(
                    scored,
                    self.tokenizer,
                    examples,
                    name,
                    style=style,
                    batch_size=int(self.cfg.get("eval_batch_size", 8)),
                    **generation,
                )
                out[f"test_{name}_accuracy"] = res["accuracy"]
                out[f"test_{name}_no_match"] = res["no_match"]
            accs = [v for k, v in out.items() if k.endswith("_accuracy")]
            if accs:
                out["test_avg_accuracy"] = sum(accs) / len(accs)
            if self.cfg.get("lm_eval"):
                res = cs.evaluate_with_lm_eval(scored, self.tokenizer, limit=limit)
                out.update({f"lm_eval_{k}": v for k, v in res.items()})
        return out


# How the trained model is scored: each entry is a context manager giving the model to evaluate.
EVAL_WEIGHTS: dict = {}


def _eval_weights(name):
    def deco(fn):
        EVAL_WEIGHTS[name] = contextlib.contextmanager(fn)
        return fn

    return deco


@_eval_weights("unmerged")
def _unmerged(task, model):
    """The trained model as it is: frozen base + adapter, each in its own precision. Merging into a
    bf16 base would round small updates away (bf16 keeps 8 significant bits)."""
    yield model


@_eval_weights("merged_fp16")
def _merged_fp16(task, model):
    """The reference's evaluator: the pretrained weights loaded in fp16, the saved adapter loaded on
    top and merged in fp16 (LLM-Adapters' PEFT fork merges on ``model.eval()``). Built from a fresh
    pretrained model and the stock-PEFT adapter (:func:`pilora.export.save_peft_adapter`), so it
    also checks that the saved adapter reproduces the trained model."""
    import tempfile

    import torch
    from peft import PeftModel

    from ..export import save_peft_adapter

    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as d:
        save_peft_adapter(model, d)
        base = task.build_model().to(device=device, dtype=torch.float16)
        merged = PeftModel.from_pretrained(base, d).to(dtype=torch.float16).merge_and_unload()
    try:
        yield merged.eval()
    finally:
        del merged, base
