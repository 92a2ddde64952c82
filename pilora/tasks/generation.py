"""Generation tasks with a causal LM: prompt -> generate -> extract the answer by a regex ->
accuracy per test set (and per-example predictions as jsonl).

One family (``family: generation``) runs every such task from its YAML alone: the training file
(``task.dataset.train_file``, records with ``instruction`` / ``output``, ``input`` optional), the test
sets (``task.eval_sets``: ``{name: json file}``, records with ``instruction`` / ``answer``, ``input``
optional) and the answer pattern (``task.answer_pattern``). The defaults are the LLM-Adapters / DoRA commonsense
protocol (:mod:`pilora.tasks.llm_adapters`): its prompts, 4-beam decoding, batch size 1, fp16
merged evaluation, and, without ``answer_pattern``, each commonsense test set's own answer regex.
``conf/task/commonsense/commonsense170k.yaml`` is that protocol; a numeric-answer task (GSM8K-like)
is the same family with e.g. ``answer_pattern: 'answer is (-?[0-9]+)'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re

from ..hints import did_you_mean
from . import llm_adapters as cs
from .base import DataError, Task, load_pretrained, load_tokenizer, register_family, require_columns
from .schema import TaskSettings, setting

log = logging.getLogger("pilora")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationSettings(TaskSettings):
    """``task.*`` of a generation task. ``dataset`` holds ``train_file`` (and e.g. ``root``)."""

    eval_sets: dict = setting(factory=dict, help="{name: test json file}: the test sets scored after training")
    eval_only: list | str | None = setting(None, help="score only these sets of eval_sets, by name (null: all)")
    eval_limit: int | None = setting(None, low=1, help="examples per test set (null: all)")
    eval_batch_size: int | None = setting(
        cs.REFERENCE_EVAL_BATCH_SIZE, low=1, help="prompts per generate call (> 1: left padding with masks)"
    )
    generation: dict | None = setting(
        None, help="model.generate settings over the reference's (llm_adapters.REFERENCE_GENERATION)"
    )
    eval_weights: str = setting("merged_fp16", help="how the trained model is scored (EVAL_WEIGHTS)")
    prompt_style: str = setting(cs.DEFAULT_PROMPT_STYLE, help="prompt strings (llm_adapters.PROMPT_STYLES)")
    answer_pattern: str | dict | None = setting(
        None,
        help="regex of the answer in a response; its first match (first group, if it has one) is "
        "compared with the gold answer. A mapping gives one per test set; null: the LLM-Adapters "
        "commonsense set's own (llm_adapters.ANSWER_PATTERNS)",
    )
    val_set_size: int = setting(120, low=1, help="held-out training examples for the validation loss")
    val_split_seed: int = setting(42, help="seed of that split (the reference's: the same examples every run)")
    cutoff_len: int = setting(256, low=1, help="tokens of a training example")
    train_on_inputs: bool = setting(
        True, help="loss on the whole prompt (false: the prompt's tokens masked, as finetune.py counts them)"
    )
    lm_eval: bool = setting(
        False, help="also run lm-eval's log-likelihood protocol on the scored sets (labelled, not comparable)"
    )
    reference: str = setting(
        "DoRA commonsense_evaluate.py (NVlabs/DoRA 7e2f10a, on LLM-Adapters)", help="the protocol the numbers follow"
    )
    metric: str = setting("loss", help="the per-epoch metric the best epoch is chosen on")
    metric_mode: str = setting("min", help="max or min: which end of `metric` is best")


@dataclasses.dataclass(frozen=True)
class Bound:
    """The values a ``task.generation`` key may take: integers (``integer``) or numbers from ``low``
    (excluded when ``above``) to ``high`` (None: no upper end); null always (transformers' default)."""

    integer: bool
    low: float
    high: float | None = None
    above: bool = False
    why: str = ""

    def admits(self, value) -> bool:
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        return (value > self.low if self.above else value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high == self.low:
            return str(self.low)
        what = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{what} {'>' if self.above else '>='} {self.low}"
        return f"{what} in {'(' if self.above else '['}{self.low}, {self.high}]"


# task.generation values that GenerationConfig.validate() lets through but generate() fails on
# during the final evaluation, after training (num_beams=0 divides by zero, num_beams=abc is a
# TypeError, temperature=0 is refused) or scores wrongly (num_return_sequences=2 returns two
# responses per prompt, which the scorer pairs with the wrong examples)
GENERATION_BOUNDS: dict[str, Bound] = {
    "num_beams": Bound(integer=True, low=1),
    "num_beam_groups": Bound(integer=True, low=1),
    "num_return_sequences": Bound(integer=True, low=1, high=1, why="each prompt's one response is scored"),
    "max_new_tokens": Bound(integer=True, low=1),
    "min_new_tokens": Bound(integer=True, low=0),
    "max_length": Bound(integer=True, low=1),
    "min_length": Bound(integer=True, low=0),
    "top_k": Bound(integer=True, low=0),
    "no_repeat_ngram_size": Bound(integer=True, low=0),
    "temperature": Bound(integer=False, low=0, above=True),
    "top_p": Bound(integer=False, low=0, high=1, above=True),
    "typical_p": Bound(integer=False, low=0, high=1, above=True),
    "min_p": Bound(integer=False, low=0, high=1),
    "repetition_penalty": Bound(integer=False, low=0, above=True),
}


def check_generation(settings: dict) -> None:
    """Every ``task.generation`` value of :data:`GENERATION_BOUNDS` within its bound (null: unset)."""
    for key, value in settings.items():
        bound = GENERATION_BOUNDS.get(key)
        if bound is not None and value is not None and not bound.admits(value):
            why = f" ({bound.why})" if bound.why else ""
            raise ValueError(
                f"task.generation.{key}={value!r} is not allowed: it must be {bound}{why}, or null for transformers' "
                f"default; set task.generation.{key} to {bound}"
            )


def select_test_sets(eval_sets: dict, eval_only, task_name: str) -> dict[str, str]:
    """``{name: file}`` of the sets of ``eval_sets`` (those with a file) that ``eval_only`` names, in
    its order (all of them for None); an unknown name raises, listing the valid ones."""
    sets = {name: path for name, path in (eval_sets or {}).items() if path}
    if eval_only is None:
        return sets
    only = [eval_only] if isinstance(eval_only, str) else list(eval_only)
    unknown = [n for n in only if n not in sets]
    if unknown:
        raise ValueError(
            f"task.eval_only names {unknown}, not test sets of task {task_name!r}; "
            f"choose from {sorted(sets)} (task.eval_sets)"
        )
    return {n: sets[n] for n in only}


@register_family("generation")
class GenerationTask(Task):
    """Train on instruction json, validate on a held-out slice (loss), and score each test set by
    generation (4-beam search by default) + regex answer extraction."""

    model_families = ("causal_lm",)
    example_model = "llama2-7b"
    task_type = "CAUSAL_LM"
    accepts_loss_kwargs = None  # HF causal LMs average the token loss over num_items_in_batch
    settings_cls = GenerationSettings
    # set by the runner (pilora.runner.evaluate.SetProgress): the test sets an interrupted evaluation
    # finished (reused, not scored again), and where each finished set is saved as it finishes
    set_progress = None
    # settings that change only the final evaluation: a rerun differing in them reuses the adapter
    evaluation_keys = (
        "eval_sets",
        "eval_only",
        "eval_limit",
        "eval_batch_size",
        "generation",
        "eval_weights",
        "lm_eval",
    )

    def __init__(self, task_cfg, model_cfg, seed=0):
        super().__init__(task_cfg, model_cfg, seed)
        self.tokenizer = load_tokenizer(model_cfg)
        if self.tokenizer.pad_token is None:
            # LLaMA tokenizers have no pad token; LLM-Adapters pads with id 0 (unk)
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        if self.tokenizer.eos_token is None:
            raise DataError(
                f"tokenizer {model_cfg.get('tokenizer') or model_cfg.get('path')!r} has no EOS "
                "token; the generation protocol appends EOS to every example"
            )

    def build_model(self):
        from transformers import AutoModelForCausalLM

        model = load_pretrained(self.model_cfg, AutoModelForCausalLM)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def datasets(self):
        s = self.settings
        train_file = s.dataset["train_file"]
        if not os.path.exists(os.path.expanduser(train_file)):
            hint = (
                "download LLM-Adapters' ft-training_set/commonsense_170k.json and set task.dataset.train_file"
                if s.answer_pattern is None
                else "set task.dataset.train_file to a json list of instruction/input/output records"
            )
            raise DataError(f"training file {train_file!r} not found; {hint}")
        ds = _training_records(train_file)
        require_columns(ds, ["instruction", "output"], self.name)
        for column in ("instruction", "output"):
            # a null output would train on the bare prompt (format_prompt's evaluation form)
            bad = [i for i, v in enumerate(ds[column]) if not isinstance(v, str)]
            if bad:
                raise DataError(
                    f"training file {train_file!r}: record {bad[0]} ({len(bad)} in all) has {column!r} = "
                    f"{ds[bad[0]][column]!r}, not text; fix or drop those records"
                )
        n_val = s.val_set_size
        if len(ds) <= n_val:
            raise DataError(f"{train_file!r} has {len(ds)} examples, not more than val_set_size={n_val}")
        # finetune.py splits with seed 42 whatever the run's seed, so every run validates on the same 120
        split = ds.train_test_split(test_size=n_val, shuffle=True, seed=s.val_split_seed)
        tok = lambda ex: cs.tokenize_for_training(  # noqa: E731
            ex,
            self.tokenizer,
            cutoff_len=s.cutoff_len,
            train_on_inputs=s.train_on_inputs,
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
        style = self.settings.prompt_style
        if style not in cs.PROMPT_STYLES:
            raise ValueError(
                f"task.prompt_style={style!r} is not a prompt style; choose one of {sorted(cs.PROMPT_STYLES)}"
            )
        return style

    @property
    def generation(self) -> dict:
        """Decoding settings: the reference's, overridden by ``task.generation.*``."""
        from transformers import GenerationConfig

        settings = {**cs.REFERENCE_GENERATION, **(self.settings.generation or {})}
        known = GenerationConfig().to_dict()
        unknown = sorted(k for k in settings if k not in known)
        if unknown:
            raise ValueError(
                f"task.generation.{unknown[0]} is not a transformers.GenerationConfig setting"
                + did_you_mean(unknown[0], known, n=3)
            )
        return settings

    @property
    def eval_weights(self) -> str:
        mode = self.settings.eval_weights
        if mode not in EVAL_WEIGHTS:
            raise ValueError(
                f"task.eval_weights={mode!r} is not an evaluation mode; choose one of {sorted(EVAL_WEIGHTS)}"
            )
        return mode

    def answer_pattern(self, name: str) -> re.Pattern | None:
        """The answer regex of test set ``name``: ``task.answer_pattern`` (or its entry for the set);
        None: the LLM-Adapters set's own (:data:`pilora.tasks.llm_adapters.ANSWER_PATTERNS`)."""
        pattern = self.settings.answer_pattern
        if isinstance(pattern, dict):
            pattern = pattern.get(name)
        where = f"task.answer_pattern{f'.{name}' if isinstance(self.settings.answer_pattern, dict) else ''}"
        if pattern is None:
            try:
                cs._canonical_dataset(name)
            except ValueError:
                raise ValueError(
                    f"test set {name!r} of task {self.name!r} has no answer pattern: it is not an "
                    f"LLM-Adapters commonsense set ({', '.join(cs.ANSWER_PATTERNS)}); set {where}=<regex>"
                ) from None
            return None
        if not isinstance(pattern, str):
            raise ValueError(f"{where} must be a regex string, got {pattern!r}")
        try:
            return re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{where}={pattern!r} is not a valid regex: {err}") from None

    @classmethod
    def check_config(cls, task_cfg: dict) -> None:
        """The evaluation's settings and test files, which are used only after training: a wrong
        one fails here, before the job's folder is made."""
        super().check_config(task_cfg)  # keys, types and bounds (GenerationSettings)
        probe = cls.probe(task_cfg)  # these properties read only the config
        settings = (probe.eval_weights, probe.prompt_style, probe.generation)
        check_generation(settings[2])  # what GenerationConfig.validate lets through (GENERATION_BOUNDS)
        from transformers import GenerationConfig

        try:
            GenerationConfig(**settings[2]).validate(strict=True)
        except ValueError as err:
            raise ValueError(
                f"task.generation {settings[2]} is refused by transformers.GenerationConfig: {err}"
            ) from None
        sets = {name: path for name, path in probe.test_sets().items() if path}  # task.eval_only's, if set
        root = probe.settings.dataset.get("root")
        under = [p for p in [probe.settings.dataset["train_file"], *sets.values()] if str(p).startswith(str(root))]
        if root and under and not os.path.isdir(os.path.expanduser(str(root))):
            # one line about the folder, not a missing-file error about whichever set comes first
            raise DataError(
                f"task.dataset.root={root!r} does not exist; it should hold LLM-Adapters' "
                "ft-training_set/ and dataset/<name>/test.json: set task.dataset.root to where they "
                f"are. {cs._DOWNLOAD_HINT}"
            )
        for name, path in sets.items():
            probe.answer_pattern(name)
            check_test_file(name, path)
        if probe.settings.lm_eval:
            cs.lm_eval_tasks(sets)  # a set lm-eval does not have fails now, not after training

    def headline(self):
        """The mean of the test sets' accuracies (the papers' Avg. column)."""
        return {"metric": "test_avg_accuracy", "split": "test", "from": "test"}

    def protocol(self) -> dict:
        return {
            "reported_split": "test",
            "headline": self.headline(),
            "reference": self.settings.reference,
            "prompt_style": self.prompt_style,
            "generation": self.generation,
            "eval_weights": self.eval_weights,
            "base_dtype": self.model_cfg.get("dtype") or "float32",  # the trained base's precision
            "best_epoch_on": "validation (held-out training examples)",
            **({"answer_pattern": self.settings.answer_pattern} if self.settings.answer_pattern is not None else {}),
        }

    def test_sets(self) -> dict[str, str]:
        """``{name: file}`` of the test sets scored: every set of ``task.eval_sets``, or only those
        named in ``task.eval_only`` (a list, e.g. ``task.eval_only=[ARC-Easy,boolq]``)."""
        return select_test_sets(self.settings.eval_sets, self.settings.eval_only, self.name)

    def evaluation_datasets(self):
        """Nothing: :meth:`final_metrics` reads the test sets itself, so scoring a trained model
        needs neither the training file nor its tokenisation (170k examples for Table 1)."""
        return {"train": None, "validation": None, "test": None}

    def input_paths(self) -> dict[str, str]:
        files = {"task.dataset.train_file": self.settings.dataset["train_file"]}
        files.update({f"task.eval_sets.{n}": p for n, p in self.test_sets().items()})
        return files

    def final_metrics(self, model, trainer, data):
        """Accuracy on each configured test set by generation, and Avg. With ``predictions_dir``
        set, every example's instruction, gold answer, response, extracted answer and whether it
        is correct go to ``<predictions_dir>/<set>.jsonl`` (the reference evaluator's output).
        ``test_<set>_total`` is the number of examples scored. With :attr:`set_progress` set, a set
        that an interrupted evaluation finished under the same settings is taken from it, and each
        set is saved there as soon as it is scored (Table 1's eight sets take hours at batch 1)."""
        sets = self.test_sets()
        limit = self.settings.eval_limit
        generation, style = self.generation, self.prompt_style  # bad settings fail before any work
        patterns = {name: self.answer_pattern(name) for name in sets}
        batch_size = self.settings.eval_batch_size or cs.REFERENCE_EVAL_BATCH_SIZE
        progress = self.set_progress
        out = {}
        with EVAL_WEIGHTS[self.eval_weights](self, model) as scored:
            for name, path in sets.items():
                saved = progress.finished(name) if progress is not None else None
                if saved is not None:
                    log.info("test set %s: scored by an interrupted evaluation under these settings; kept", name)
                    out.update(saved)
                    continue
                examples = cs.load_commonsense_split(path)
                if limit:
                    examples = examples.select(range(min(limit, len(examples))))
                else:
                    self._warn_if_not_reference_size(name, path, len(examples))
                res = cs.evaluate_dataset(
                    scored,
                    self.tokenizer,
                    examples,
                    name,
                    style=style,
                    batch_size=batch_size,
                    return_predictions=self.predictions_dir is not None,
                    pattern=patterns[name],
                    **generation,
                )
                if self.predictions_dir is not None:
                    write_predictions(os.path.join(self.predictions_dir, f"{name}.jsonl"), examples, res)
                metrics = {
                    f"test_{name}_accuracy": res["accuracy"],
                    f"test_{name}_no_match": res["no_match"],
                    f"test_{name}_total": res["total"],
                }
                if progress is not None:
                    progress.save(name, metrics)
                out.update(metrics)
            # in the sets' order, the finished ones included: the numbers of an uninterrupted run
            accs = [v for k, v in out.items() if k.endswith("_accuracy")]
            if accs:
                out["test_avg_accuracy"] = sum(accs) / len(accs)
            if self.settings.lm_eval:
                res = cs.evaluate_with_lm_eval(scored, self.tokenizer, tasks=cs.lm_eval_tasks(sets), limit=limit)
                out.update({f"lm_eval_{k}": v for k, v in res.items()})
        return out

    def _warn_if_not_reference_size(self, name: str, path: str, n: int) -> None:
        reference = cs.reference_size(name)
        if reference is not None and n != reference:
            log.warning(
                "test set %s: %s holds %d examples, not the %d of LLM-Adapters' test set (a partial "
                "download or another file?): its score is not comparable with the papers'",
                name,
                path,
                n,
                reference,
            )

    def size_mismatches(self, test_metrics: dict) -> dict:
        """``{set: {file, examples, reference}}`` of the sets of ``test_metrics`` scored in full
        (``eval_limit`` null) whose size is not LLM-Adapters' (:data:`llm_adapters.EVAL_SETS`):
        the record says its scores are not the papers' sets'."""
        if self.settings.eval_limit:
            return {}
        found = {}
        for name, path in (self.settings.eval_sets or {}).items():
            n, reference = test_metrics.get(f"test_{name}_total"), cs.reference_size(name)
            if n is not None and reference is not None and n != reference:
                found[name] = {"file": str(path), "examples": n, "reference": reference}
        return found


def write_predictions(path: str, examples, result: dict) -> None:
    """One json line per example: instruction, gold answer, response, extracted answer, correct
    (written atomically: a folder never holds half a set)."""
    import json

    from ..io import atomic_write

    rows = []
    for ex, response, pred in zip(examples, result["responses"], result["predictions"]):
        gold = str(ex["answer"]).strip()
        row = {"instruction": ex["instruction"], "input": ex.get("input") or "", "answer": gold}
        row.update({"response": response, "extracted": pred, "correct": pred is not None and pred == gold})
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write(path, lambda f: f.writelines(rows), fsync=False)


def _training_records(train_file: str):
    """The training file as a Dataset; an empty list is named (``datasets`` says only that
    'Instruction "train" corresponds to no data'), and a file ``datasets`` cannot parse (truncated,
    not UTF-8) gets the test sets' message (:func:`read_json_records`), not its traceback."""
    import datasets

    try:
        # instruction and output: a training record needs no gold ``answer`` (a test record does)
        return cs.load_commonsense_split(train_file, required=("instruction", "output"))
    except datasets.exceptions.DatasetGenerationError as err:
        fix = "fix or re-download it, or set task.dataset.train_file to a JSON list of instruction/input/output records"
        read_json_records(os.path.expanduser(train_file), f"training file {train_file!r}", fix)
        # valid JSON that datasets still refuses (e.g. a field holding text in one record, a list in another)
        raise DataError(f"could not read the training file {train_file!r}: {err.__cause__ or err}; {fix}") from None
    except ValueError as err:
        if "corresponds to no data" in str(err):
            raise DataError(
                f"training file {train_file!r} holds no records (an empty list); regenerate or re-download it"
            ) from None
        raise DataError(f"could not read the training file {train_file!r}: {err}") from None


def read_json_records(file: str, what: str, fix: str) -> list[dict]:
    """The records of ``file``, a JSON list of objects; otherwise a :class:`DataError` ``<what> is
    not ...: <the problem>; <fix>`` (``what`` names the set or the file, ``fix`` says what to do)."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            rows = json.load(f)
    except UnicodeDecodeError as err:
        raise DataError(f"{what} is not UTF-8 text ({err}): save it as UTF-8, or {fix}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{what} is not valid JSON (truncated?): {err}; {fix}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{what} is not a non-empty JSON list of records; {fix}")
    return rows


def check_test_file(name: str, path: str) -> None:
    """A test set named by ``task.eval_sets.<name>`` exists and is a complete JSON list of records
    with ``instruction`` and ``answer``: a truncated download fails before training, not after it."""
    file = os.path.expanduser(str(path))
    if os.path.isdir(file):
        file = os.path.join(file, "test.json")
    fix = f"fix or re-download it, or leave the set out (task.eval_only=[<the others>] or ~task.eval_sets.{name})"
    if not os.path.isfile(file):
        raise DataError(f"test set {name!r}: {file!r} does not exist; {fix}. {cs._DOWNLOAD_HINT}")
    rows = read_json_records(file, f"test set {name!r}: {file!r}", fix)
    missing = sorted({"instruction", "answer"} - set().union(*(r.keys() for r in rows)))
    if missing:
        raise DataError(f"test set {name!r}: {file!r} has no {', '.join(missing)} field; {fix}")


# How the trained model is scored: each entry is a context manager giving the model to evaluate.
EVAL_WEIGHTS: dict = {}


def _eval_weights(name):
    def deco(fn):
        EVAL_WEIGHTS[name] = contextlib.contextmanager(fn)
        return fn

    return deco


@_eval_weights("unmerged")
def _unmerged(task, model):
    """The trained model as it is: frozen base + adapter, each in its own precision (an option,
    not the reference's protocol). Merging into a bf16 base would round small updates away (bf16
    keeps 8 significant bits), so a bf16 run is best scored this way."""
    yield model


def pretrained_fp16(task):
    """The pretrained weights in fp16, loaded afresh, as DoRA's commonsense_evaluate.py load_model()
    does (``AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float16)``).

    From a checkpoint this is the stored values converted once to fp16 (LLaMA-2's hub files are
    fp16, so exactly the stored weights), never the trained model cast: a base loaded in bf16 and
    then cast to fp16 keeps bf16's rounding. A ``from_config`` model (tiny test variants) has no
    stored weights; its pretrained weights are the seeded initialisation the runner builds
    (``torch.manual_seed(seed)`` before ``build_model()``), rebuilt here the same way and cast.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if task.model_cfg.get("from_config"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(task.seed))
            base = task.build_model()
        return base.to(torch.float16)
    base = load_pretrained({**task.model_cfg, "dtype": "float16"}, AutoModelForCausalLM)
    base.config.pad_token_id = task.tokenizer.pad_token_id
    return base


@_eval_weights("merged_fp16")
def _merged_fp16(task, model):
    """The cited evaluator, DoRA's commonsense_evaluate.py: the pretrained weights loaded in fp16
    (:func:`pretrained_fp16`), the saved adapter loaded on top, and merged in fp16. Its main() sets
    ``module.merge_weights = True; module.train(mode=False)`` on every target module, and its PEFT
    fork's ``Linear.train`` then runs ``self.weight.data += B @ A * scaling``: lora_A/B are fp32
    (the fork builds them in fp32 and ignores the torch_dtype given to PeftModel.from_pretrained),
    so the fp32 update is added to the fp16 weight and rounded once. Stock PEFT's merge_and_unload
    with the adapter kept in fp32 (``autocast_adapter_dtype``) does the same ``data += delta``.
    (LLM-Adapters' own evaluator does not merge at all.) The adapter is the stock-PEFT one the run
    saves (:func:`pilora.export.save_peft_adapter`), so this also checks that it reproduces the
    trained model."""
    import copy
    import tempfile

    import torch
    from peft import PeftModel

    from ..export import save_peft_adapter

    device = next(model.parameters()).device
    if not isinstance(model, PeftModel):  # full fine-tuning: no adapter, the trained weights in fp16
        scored = copy.deepcopy(model).to(torch.float16)
        try:
            yield scored.eval()
        finally:
            del scored
        return
    with tempfile.TemporaryDirectory() as d:
        save_peft_adapter(model, d)  # LoRA-Dash included: its rank r + s export keeps the dash term
        base = pretrained_fp16(task).to(device)
        merged = PeftModel.from_pretrained(base, d).merge_and_unload()
    try:
        yield merged.eval()
    finally:
        del merged, base
