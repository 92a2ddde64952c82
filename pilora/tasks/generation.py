"""Commonsense reasoning with a causal LM (LLM-Adapters / DoRA protocol, DESIGN.md §3)."""

from __future__ import annotations

import os

from . import commonsense as cs
from .base import DataError, Task, load_pretrained, load_tokenizer, register_family, require_columns


@register_family("generation")
class CommonsenseTask(Task):
    """Train on Commonsense170K-style json, validate on a held-out slice (loss), and score the
    eight test sets by greedy generation + regex answer extraction after training."""

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
            raise DataError(f"tokenizer {model_cfg.get('tokenizer') or model_cfg.get('path')!r} has no EOS "
                            "token; the commonsense protocol appends EOS to every example")

    def build_model(self):
        from transformers import AutoModelForCausalLM

        model = load_pretrained(self.model_cfg, AutoModelForCausalLM)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def datasets(self):
        train_file = self.cfg["dataset"]["train_file"]
        if not os.path.exists(os.path.expanduser(train_file)):
            raise DataError(f"training file {train_file!r} not found; download LLM-Adapters' "
                            "ft-training_set/commonsense_170k.json and set task.dataset.train_file")
        ds = cs.load_commonsense_split(train_file)
        require_columns(ds, ["instruction", "output"], self.name)
        n_val = int(self.cfg.get("val_set_size", 120))
        if len(ds) <= n_val:
            raise DataError(f"{train_file!r} has {len(ds)} examples, not more than val_set_size={n_val}")
        split = ds.train_test_split(test_size=n_val, shuffle=True, seed=self.seed)
        tok = lambda ex: cs.tokenize_for_training(  # noqa: E731
            ex, self.tokenizer, cutoff_len=int(self.cfg.get("cutoff_len", 256)),
            train_on_inputs=bool(self.cfg.get("train_on_inputs", True)))
        cols = split["train"].column_names
        return {"train": split["train"].map(tok, remove_columns=cols, desc="tokenize train"),
                "validation": split["test"].map(tok, remove_columns=cols, desc="tokenize validation"),
                "test": None}

    def collator(self):
        from transformers import DataCollatorForSeq2Seq
        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)

    def final_metrics(self, model, trainer, data):
        """Accuracy on each configured test set by generation from the merged model, and Avg."""
        sets = self.cfg.get("eval_sets") or {}
        limit = self.cfg.get("eval_limit")
        out = {}
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()  # the paper evaluates the merged model (Eq. 11)
        try:
            for name, path in sets.items():
                if not path:
                    continue
                examples = cs.load_commonsense_split(path)
                if limit:
                    examples = examples.select(range(min(int(limit), len(examples))))
                res = cs.evaluate_dataset(model, self.tokenizer, examples, name,
                                          batch_size=int(self.cfg.get("eval_batch_size", 8)),
                                          max_new_tokens=int(self.cfg.get("max_new_tokens", 32)))
                out[f"test_{name}_accuracy"] = res["accuracy"]
                out[f"test_{name}_no_match"] = res["no_match"]
            accs = [v for k, v in out.items() if k.endswith("_accuracy")]
            if accs:
                out["test_avg_accuracy"] = sum(accs) / len(accs)
            if self.cfg.get("lm_eval"):
                res = cs.evaluate_with_lm_eval(model, self.tokenizer, limit=limit)
                out.update({f"lm_eval_{k}": v for k, v in res.items()})
        finally:
            if merged:
                model.unmerge_adapter()
        return out
