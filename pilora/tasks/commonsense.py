"""Commonsense-reasoning protocol of LLM-Adapters / DoRA.

Models are fine-tuned on ``commonsense_170k.json`` (the union of the eight
training sets, rendered as Alpaca-style instructions) and evaluated on the
eight test sets by *generating* an answer and pulling the first
answer-shaped token (``true``, ``solution2``, ``answer3``, ...) out of the
generated text with a dataset-specific regex.  This module implements that
protocol:

* :data:`EVAL_SETS` / :data:`ANSWER_PATTERNS` - the test sets and extractors;
* :func:`format_prompt` / :func:`tokenize_for_training` - training data;
* :func:`generate_answers` / :func:`evaluate_dataset` - generation-based eval;
* :func:`load_commonsense_split` - the LLM-Adapters json files;
* :func:`evaluate_with_lm_eval` - the *different* log-likelihood protocol of
  lm-evaluation-harness, kept only as a sanity check.

Differences from the reference scripts, on purpose:

* generation uses left padding with attention masks, so batch size does not
  change the answers (the reference pads on the right, which corrupts the
  continuation of every prompt shorter than the longest in its batch);
* decoding is greedy by default (the reference uses 4-beam search); pass
  ``num_beams=4`` through ``generate_kwargs`` to match it.

Heavy libraries (torch, datasets, lm_eval) are imported inside the functions
that need them so that importing this module, e.g. for the constants, is cheap.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "EVAL_SETS",
    "ANSWER_PATTERNS",
    "LM_EVAL_TASKS",
    "LM_EVAL_PROTOCOL",
    "format_prompt",
    "tokenize_for_training",
    "extract_answer",
    "generate_answers",
    "evaluate_dataset",
    "load_commonsense_split",
    "evaluate_with_lm_eval",
]

# Test sets in the order the papers' tables use, with their sizes.
EVAL_SETS: "OrderedDict[str, int]" = OrderedDict(
    [
        ("boolq", 3270),
        ("piqa", 1838),
        ("social_i_qa", 1954),
        ("hellaswag", 10042),
        ("winogrande", 1267),
        ("ARC-Easy", 2376),
        ("ARC-Challenge", 1172),
        ("openbookqa", 500),
    ]
)

_FIVE_ANSWERS = "answer1|answer2|answer3|answer4|answer5"

# Case-sensitive like the reference: the training targets are all lowercase,
# and matching "True" as well would change the numbers relative to the papers.
ANSWER_PATTERNS: "OrderedDict[str, str]" = OrderedDict(
    [
        ("boolq", r"true|false"),
        ("piqa", r"solution1|solution2"),
        ("social_i_qa", _FIVE_ANSWERS),
        ("hellaswag", r"ending1|ending2|ending3|ending4"),
        ("winogrande", r"option1|option2"),
        # ARC and OpenBookQA have at most 4 (ARC: rarely 5) choices, but the
        # reference extractor accepts answer1-5 for all of them.
        ("ARC-Easy", _FIVE_ANSWERS),
        ("ARC-Challenge", _FIVE_ANSWERS),
        ("openbookqa", _FIVE_ANSWERS),
    ]
)

_COMPILED = {name: re.compile(p) for name, p in ANSWER_PATTERNS.items()}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


# Lets callers use lm-eval style or differently-cased names for the same set.
_NAME_LOOKUP = {_normalise_name(n): n for n in ANSWER_PATTERNS}
_NAME_LOOKUP["social_iqa"] = "social_i_qa"

LM_EVAL_TASKS = (
    "boolq",
    "piqa",
    "social_iqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
LM_EVAL_PROTOCOL = "lm-eval log-likelihood (not comparable with the paper's generation protocol)"

_RESPONSE_MARKER = "### Response:"

_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_DOWNLOAD_HINT = (
    "Get the files from the LLM-Adapters repository "
    "(https://github.com/AGI-Edgerunners/LLM-Adapters): the training set is "
    "`ft-training_set/commonsense_170k.json` and each test set is "
    "`dataset/<name>/test.json` with <name> one of " + ", ".join(EVAL_SETS) + "."
)


def _canonical_dataset(dataset: str) -> str:
    """Return the canonical EVAL_SETS name for ``dataset`` or raise ValueError."""
    if dataset in ANSWER_PATTERNS:
        return dataset
    if isinstance(dataset, str):
        found = _NAME_LOOKUP.get(_normalise_name(dataset))
        if found is not None:
            return found
    raise ValueError(
        f"unknown commonsense dataset {dataset!r}; known datasets: {', '.join(ANSWER_PATTERNS)}"
    )


# --------------------------------------------------------------------------- prompts


def format_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """Render an Alpaca-style prompt as used by LLM-Adapters.

    Args:
        instruction: the task text (question plus answer options).
        input: optional extra context; an empty string counts as absent,
            because the LLM-Adapters json files store ``"input": ""``.
        output: when given, appended right after ``### Response:\\n`` (the
            training target); leave ``None`` for an evaluation prompt.

    Returns:
        The prompt string.
    """
    if input:
        prompt = _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    else:
        prompt = _PROMPT_NO_INPUT.format(instruction=instruction)
    if output is not None:
        prompt += output
    return prompt


def _tokenize(text: str, tokenizer: Any, cutoff_len: int, add_eos_token: bool) -> dict[str, list[int]]:
    enc = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    input_ids = list(enc["input_ids"])
    attention_mask = list(enc["attention_mask"])
    if add_eos_token:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                "the tokenizer has no eos_token; set tokenizer.eos_token (the model must learn "
                "to stop after the answer) or call with add_eos_token=False"
            )
        # Reference behaviour: a truncated sequence gets no EOS (no room), and
        # tokenizers that already end with EOS do not get a second one.
        if (not input_ids or input_ids[-1] != eos) and len(input_ids) < cutoff_len:
            input_ids.append(eos)
            attention_mask.append(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize_for_training(
    example: Mapping[str, Any],
    tokenizer: Any,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    add_eos_token: bool = True,
) -> dict[str, list[int]]:
    """Tokenize one training example the way LLM-Adapters' ``finetune.py`` does.

    The full prompt (instruction, optional input, output) is tokenized with
    truncation to ``cutoff_len`` tokens; EOS is appended when there is room
    and the sequence does not already end with it.

    Args:
        example: mapping with ``instruction`` and ``output`` (``input`` optional).
        tokenizer: a Hugging Face tokenizer; it must define ``eos_token`` when
            ``add_eos_token`` is true.
        cutoff_len: maximum sequence length in tokens.
        train_on_inputs: if true the labels equal ``input_ids``; otherwise
            the prompt tokens are masked with -100 so the loss only covers the
            response (and EOS).
        add_eos_token: append EOS as described above.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` as lists of ints.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    missing = [k for k in ("instruction", "output") if k not in example]
    if missing:
        raise KeyError(f"training example lacks {missing}; it has {sorted(example)}")
    full = format_prompt(example["instruction"], example.get("input"), example["output"])
    result = _tokenize(full, tokenizer, cutoff_len, add_eos_token)
    if train_on_inputs:
        result["labels"] = list(result["input_ids"])
        return result

    prompt_ids = _tokenize(
        format_prompt(example["instruction"], example.get("input")), tokenizer, cutoff_len, False
    )["input_ids"]
    # The reference masks len(prompt_ids) tokens.  Using the common prefix
    # instead gives the same count for LLaMA-style tokenizers, and does not
    # mask a response token for tokenizers that close every sequence with a
    # special token (e.g. BERT's [SEP]) or that merge across the boundary.
    n_prompt = 0
    for a, b in zip(prompt_ids, result["input_ids"]):
        if a != b:
            break
        n_prompt += 1
    ids = result["input_ids"]
    result["labels"] = [-100] * n_prompt + ids[n_prompt:]
    return result


# --------------------------------------------------------------------------- answers


def extract_answer(dataset: str, text: str | None) -> str | None:
    """Return the first answer-shaped string in a generation, or None.

    If ``text`` still contains the prompt, only the part after the first
    ``### Response:`` (up to a second one, if the model produced another
    turn) is searched, as in the reference evaluator.

    Args:
        dataset: one of :data:`EVAL_SETS` (case and ``-``/``_`` are ignored;
            the lm-eval names ``social_iqa``/``arc_easy``/``arc_challenge``
            are also accepted).
        text: the generated text.

    Returns:
        The first match of ``ANSWER_PATTERNS[dataset]``, or None if nothing matches.

    Raises:
        ValueError: for an unknown dataset name.
    """
    pattern = _COMPILED[_canonical_dataset(dataset)]
    if text is None:
        return None
    if _RESPONSE_MARKER in text:
        text = text.split(_RESPONSE_MARKER)[1]
    match = pattern.search(text.strip())
    return match.group(0) if match else None


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy-decode a continuation for each prompt, in batches.

    Prompts are padded on the LEFT with an attention mask so that every
    prompt's last token sits at the end of the batch and the new tokens of a
    short prompt are not conditioned on pad tokens; the result therefore does
    not depend on ``batch_size``.  The tokenizer's ``padding_side`` (and pad
    token, which falls back to EOS when missing) is restored afterwards, and so
    is the model's train/eval mode.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer.
        prompts: prompt strings (e.g. from :func:`format_prompt`).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: generation budget per prompt.
        **generate_kwargs: forwarded to ``model.generate`` (e.g. ``num_beams=4``
            to match the reference's beam search).

    Returns:
        The decoded new tokens (special tokens skipped), one string per prompt.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        return []

    old_padding_side = tokenizer.padding_side
    borrowed_pad = tokenizer.pad_token is None
    if borrowed_pad:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    try:
        device = next(model.parameters()).device
    except StopIteration:  # parameter-less wrapper; let generate place things
        device = None

    kwargs = {"do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id}
    kwargs.update(generate_kwargs)
    outputs: list[str] = []
    try:
        tokenizer.padding_side = "left"
        model.eval()
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True)
            # Only these two: e.g. BERT-style token_type_ids are not accepted by causal LMs.
            inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
            if device is not None:
                inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_padding_side
        if borrowed_pad:
            tokenizer.pad_token = None
        model.train(was_training)
    return outputs


def evaluate_dataset(
    model: Any,
    tokenizer: Any,
    examples: Iterable[Mapping[str, Any]],
    dataset: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    return_predictions: bool = False,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generation-based accuracy on one commonsense test set.

    Each example is rendered with :func:`format_prompt` (no output), answered
    with :func:`generate_answers`, and scored by comparing
    :func:`extract_answer` with the gold ``answer``; a generation without any
    answer-shaped string counts as wrong.

    Args:
        model, tokenizer: the model under test.
        examples: rows with ``instruction`` and ``answer`` (``input`` optional),
            e.g. from :func:`load_commonsense_split`.
        dataset: test-set name, selects the answer regex.
        batch_size, max_new_tokens, **generate_kwargs: see :func:`generate_answers`.
        return_predictions: also return the per-example ``predictions``
            (extracted answers) and raw ``generations``.

    Returns:
        ``{"accuracy", "correct", "total", "no_match"}`` (plus
        ``predictions``/``generations`` when requested).
    """
    name = _canonical_dataset(dataset)  # fail before spending time generating
    rows = [dict(ex) for ex in examples]
    if not rows:
        raise ValueError(f"no examples to evaluate for {name}")
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "answer") if k not in row]
        if missing:
            raise KeyError(f"example {i} of {name} lacks {missing}")

    prompts = [format_prompt(r["instruction"], r.get("input")) for r in rows]
    generations = generate_answers(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, **generate_kwargs
    )
    predictions = [extract_answer(name, g) for g in generations]
    correct = sum(p is not None and p == str(r["answer"]).strip() for p, r in zip(predictions, rows))
    result: dict[str, Any] = {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "no_match": sum(p is None for p in predictions),
    }
    if return_predictions:
        result["predictions"] = predictions
        result["generations"] = generations
    return result


# --------------------------------------------------------------------------- data


def load_commonsense_split(path_or_file: str | os.PathLike, cache_dir: str | None = None):
    """Load an LLM-Adapters json file (a list of instruction records).

    Args:
        path_or_file: a json file such as ``commonsense_170k.json`` or
            ``dataset/boolq/test.json``, or a directory containing ``test.json``.
        cache_dir: optional ``datasets`` cache directory.

    Returns:
        A ``datasets.Dataset`` with at least ``instruction`` and ``answer``.

    Raises:
        FileNotFoundError: when the file does not exist (the message says
            where to get it).
        ValueError: when ``instruction`` or ``answer`` columns are missing.
    """
    path = os.path.expanduser(os.fspath(path_or_file))
    if os.path.isdir(path):
        path = os.path.join(path, "test.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"commonsense data file not found: {path}. {_DOWNLOAD_HINT}")

    import datasets

    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    missing = [c for c in ("instruction", "answer") if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path} lacks required column(s) {missing}; found {ds.column_names}. "
            "Expected LLM-Adapters records {instruction, input, output, answer}."
        )
    return ds


# --------------------------------------------------------------------------- lm-eval


def evaluate_with_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = LM_EVAL_TASKS,
    batch_size: int = 8,
    limit: int | float | None = None,
) -> dict[str, Any]:
    """Accuracy under lm-evaluation-harness' log-likelihood protocol.

    This ranks the answer options by likelihood instead of generating, so the
    numbers are NOT comparable with the papers' generation protocol; the
    result carries a ``"protocol"`` key saying so.  The tasks' datasets are
    fetched from the Hugging Face hub (or its local cache).

    Args:
        model, tokenizer: an in-memory model and its tokenizer (wrapped in ``HFLM``).
        tasks: lm-eval task names.
        batch_size: lm-eval batch size.
        limit: optional cap on examples per task (int) or fraction (float).

    Returns:
        ``{task: acc, ..., "protocol": LM_EVAL_PROTOCOL}`` (``acc`` is None
        when a task reports no ``acc`` metric).

    Raises:
        RuntimeError: when lm-eval cannot be imported or its datasets cannot be
            fetched (no network / offline hub).
    """
    hint = (
        "the lm-eval protocol needs the Hugging Face hub datasets for tasks "
        f"{list(tasks)} (downloaded on first use, or present in the local HF cache); "
        "without them use evaluate_dataset() with the LLM-Adapters test.json files"
    )
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise RuntimeError(f"lm-eval could not be imported ({exc}); {hint}") from exc

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    # ConnectionError, hub HTTP/offline errors and datasets' DatasetNotFoundError
    # are all OSError subclasses; lm-eval raises ImportError for optional deps.
    except (ImportError, OSError) as exc:
        raise RuntimeError(f"lm-eval evaluation failed ({type(exc).__name__}: {exc}); {hint}") from exc

    result: dict[str, Any] = {}
    per_task = (out or {}).get("results", {})  # None on non-zero ranks
    for task in tasks:
        metrics = per_task.get(task, {})
        acc = metrics.get("acc,none", metrics.get("acc"))
        result[task] = float(acc) if acc is not None else None
    result["protocol"] = LM_EVAL_PROTOCOL
    return result
