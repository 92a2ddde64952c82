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

What follows the reference scripts exactly (``commonsense_reasoning/finetune.py`` and
``commonsense_evaluate.py`` of DoRA, github.com/NVlabs/DoRA at 7e2f10a, the code Tab. 5 cites;
LLM-Adapters' files of the same names differ where noted):

* the prompts, whitespace quirks included (:data:`PROMPT_STYLES` ``"llm_adapters"``: training
  and evaluation use two slightly different strings there, and so do we); ``"alpaca"`` is the
  clean Alpaca template, for other uses;
* decoding (:data:`REFERENCE_GENERATION`): 4-beam search, 32 new tokens, no sampling, and no
  stop at EOS: the evaluator's bare ``GenerationConfig`` has no ``eos_token_id``, so under the
  transformers it pins (v4.36.0, ``requirements.txt``) every answer runs the full 32 tokens;
* answer extraction: the *whole* sequence (prompt + generation) is decoded without special
  tokens, the text after the *last* ``### Response:`` is kept (DoRA's
  ``o.split("### Response:")[-1]``; LLM-Adapters keeps ``[1]``), and the first answer-shaped
  match in it wins (:func:`response_text`, :func:`extract_answer`);
* batch size 1 (``--batch_size 1`` in DoRA's ``llama*_DoRA_eval.sh``), so no prompt is padded.

Batches larger than 1 use left padding *with attention masks* (the reference passes none, so at
its batch size > 1 pad tokens would leak into the continuation of every shorter prompt); that the
answers then do not depend on the batch size is tested on the tiny model only, which is why the
default stays the reference's 1.

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
    "PROMPT_STYLES",
    "REFERENCE_GENERATION",
    "REFERENCE_EVAL_BATCH_SIZE",
    "lm_eval_tasks",
    "reference_size",
    "format_prompt",
    "response_text",
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
# the lm-eval task of each test set (same order as EVAL_SETS)
_LM_EVAL_TASK = dict(zip(ANSWER_PATTERNS, LM_EVAL_TASKS))
LM_EVAL_PROTOCOL = "lm-eval log-likelihood (not comparable with the paper's generation protocol)"

_RESPONSE_MARKER = "### Response:"

# Prompt templates: (training with input, training without, evaluation with input, without).
# "llm_adapters" has the strings of the reference scripts character for character: DoRA's
# commonsense_reasoning/finetune.py (training, generate_prompt(data_point)) and
# commonsense_evaluate.py (evaluation, generate_prompt(instruction, input)), the files Tab. 5
# cites. Their f-strings are indented inside the function body, so every line after the first
# starts with 16 spaces; finetune.py's first line ends in one space (with input) or two (without),
# and the evaluation strings differ from the training ones. Models trained by the reference saw
# exactly these. tests/data/ keeps the two functions verbatim and the tests run them.
_INDENT = " " * 16
PROMPT_STYLES: dict[str, tuple[str, str, str, str]] = {
    "llm_adapters": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
        f"{_INDENT}### Input:\n{_INDENT}{{input}}\n{_INDENT}\n"
        f"{_INDENT}### Response:\n{_INDENT}{{output}}",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.  \n\n"
        f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
        f"{_INDENT}### Response:\n{_INDENT}{{output}}",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
        f"{_INDENT}### Input:\n{_INDENT}{{input}}\n\n"
        f"{_INDENT}### Response:\n{_INDENT}",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request. \n\n"
        f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
        f"{_INDENT}### Response:\n{_INDENT}",
    ),
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n{output}",
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
DEFAULT_PROMPT_STYLE = "llm_adapters"

# DoRA commonsense_evaluate.py, evaluate(): GenerationConfig(temperature=0.1, top_p=0.75, top_k=40,
# num_beams=4) with sampling off (so the first three have no effect) and max_new_tokens=32. That
# GenerationConfig is built bare, without the model's eos_token_id, and transformers v4.36 (DoRA's
# requirements.txt) uses a passed config as is: the beams never finish at EOS and every
# generation is 32 tokens long. eos_token_id=None reproduces that (transformers 5 would otherwise
# fill it from model.generation_config); decoding skips the EOS tokens, the text after them stays.
REFERENCE_GENERATION: dict[str, Any] = {"num_beams": 4, "max_new_tokens": 32, "do_sample": False, "eos_token_id": None}
# DoRA's llama2_7B_DoRA_eval.sh / llama3_8B_DoRA_eval.sh: --batch_size 1.
REFERENCE_EVAL_BATCH_SIZE = 1

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
    raise ValueError(f"unknown commonsense dataset {dataset!r}; known datasets: {', '.join(ANSWER_PATTERNS)}")


def lm_eval_tasks(names: Iterable[str]) -> list[str]:
    """The lm-eval task names of the test sets ``names`` (e.g. ``["ARC-Easy", "boolq"]`` ->
    ``["arc_easy", "boolq"]``), in that order; a set that is no LLM-Adapters commonsense set has
    no lm-eval counterpart and raises, naming it."""
    tasks = []
    for name in names:
        try:
            tasks.append(_LM_EVAL_TASK[_canonical_dataset(name)])
        except ValueError:
            raise ValueError(
                f"test set {name!r} has no lm-eval task: task.lm_eval=true scores only the LLM-Adapters "
                f"commonsense sets ({', '.join(ANSWER_PATTERNS)}); set task.lm_eval=false or leave "
                f"{name!r} out (task.eval_only=[<the others>])"
            ) from None
    return tasks


def reference_size(name: str) -> int | None:
    """The size of LLM-Adapters' test set ``name`` (:data:`EVAL_SETS`), or None for another set."""
    try:
        return EVAL_SETS[_canonical_dataset(name)]
    except ValueError:
        return None


# --------------------------------------------------------------------------- prompts


def format_prompt(
    instruction: str, input: str | None = None, output: str | None = None, style: str = DEFAULT_PROMPT_STYLE
) -> str:
    """Render a prompt as the reference scripts do.

    Args:
        instruction: the task text (question plus answer options).
        input: optional extra context; an empty string counts as absent,
            because the LLM-Adapters json files store ``"input": ""``.
        output: when given, the training prompt with the target appended
            (``finetune.py``); ``None`` gives the evaluation prompt
            (``commonsense_evaluate.py``), which ends right after ``### Response:``.
        style: a key of :data:`PROMPT_STYLES`.

    Returns:
        The prompt string.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {sorted(PROMPT_STYLES)} (task.prompt_style)")
    train_in, train_plain, eval_in, eval_plain = PROMPT_STYLES[style]
    if output is None:
        return (eval_in if input else eval_plain).format(instruction=instruction, input=input)
    return (train_in if input else train_plain).format(instruction=instruction, input=input, output=output)


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
    style: str = DEFAULT_PROMPT_STYLE,
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
        train_on_inputs: if true the labels equal ``input_ids``; otherwise the first
            ``len(tokenized prompt)`` labels are -100 (the prompt tokenized on its own, without
            EOS, as ``finetune.py`` counts it), so the loss covers the response (and EOS).
        add_eos_token: append EOS as described above.
        style: prompt template, a key of :data:`PROMPT_STYLES`.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` as lists of ints.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    missing = [k for k in ("instruction", "output") if k not in example]
    if missing:
        raise KeyError(f"training example lacks {missing}; it has {sorted(example)}")
    full = format_prompt(example["instruction"], example.get("input"), example["output"], style)
    result = _tokenize(full, tokenizer, cutoff_len, add_eos_token)
    if train_on_inputs:
        result["labels"] = list(result["input_ids"])
        return result

    # The prompt part is the training template with an empty output, tokenized without EOS, and
    # its own token count is what is masked: finetune.py's generate_and_tokenize_prompt,
    # ``user_prompt_len = len(tokenize(user_prompt, add_eos_token=False)["input_ids"])``. This is
    # not always the prompt's share of the full sequence: SmolLM2's byte-level BPE ends the prompt
    # with a 16-space token where the full text has 15 spaces + " the", so the first response
    # token is masked; a BERT-style tokenizer's closing [SEP] masks one likewise. Models trained
    # by the reference were trained that way, so ours are too.
    prompt_ids = _tokenize(
        format_prompt(example["instruction"], example.get("input"), "", style), tokenizer, cutoff_len, False
    )["input_ids"]
    ids = result["input_ids"]
    # min: a prompt that tokenizes longer than the full text would make the reference's labels
    # longer than its input_ids (and crash its collator); every other case is its count
    n_prompt = min(len(prompt_ids), len(ids))
    result["labels"] = [-100] * n_prompt + ids[n_prompt:]
    return result


# --------------------------------------------------------------------------- answers


def extract_answer(dataset: str, text: str | None, pattern: "str | re.Pattern | None" = None) -> str | None:
    """Return the first answer-shaped string in a generation, or None.

    If ``text`` still contains ``### Response:``, only the part after the last one is searched,
    as in the reference evaluator (DoRA's ``split("### Response:")[-1]``).

    Args:
        dataset: one of :data:`EVAL_SETS` (case and ``-``/``_`` are ignored;
            the lm-eval names ``social_iqa``/``arc_easy``/``arc_challenge``
            are also accepted).
        text: the generated text.
        pattern: a regex to use instead of ``ANSWER_PATTERNS[dataset]`` (any ``dataset`` name then;
            a pattern with a group gives its first group, e.g. ``answer is (-?[0-9]+)``).

    Returns:
        The first match of ``ANSWER_PATTERNS[dataset]`` (or of ``pattern``), or None if nothing matches.

    Raises:
        ValueError: for an unknown dataset name without a ``pattern``.
    """
    if pattern is None:
        pattern = _COMPILED[_canonical_dataset(dataset)]
    elif isinstance(pattern, str):
        pattern = re.compile(pattern)
    if text is None:
        return None
    if _RESPONSE_MARKER in text:
        text = text.split(_RESPONSE_MARKER)[-1]
    match = pattern.search(text.strip())
    if not match:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def response_text(full_text: str, new_text: str) -> str:
    """The response the reference scores: ``full_text.split("### Response:")[-1].strip()``.

    DoRA's commonsense_evaluate.py, evaluate(): ``[o.split("### Response:")[-1].strip() for o in
    outputs]``, where ``outputs`` are the decoded prompt + generation. The kept text is the one
    after the *last* marker: when the model generates another turn, ``"true ... ### Response:
    false"``, it is ``"false"`` (LLM-Adapters' own evaluator keeps ``[1]``, i.e. ``"true ..."``).
    A tokenizer that does not reproduce the marker when decoding (e.g. an uncased one) falls back
    to the same span taken from the decoded new tokens alone: everything after their last marker.
    """
    if _RESPONSE_MARKER in full_text:
        return full_text.split(_RESPONSE_MARKER)[-1].strip()
    return new_text.split(_RESPONSE_MARKER)[-1].strip()


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = REFERENCE_EVAL_BATCH_SIZE,
    **generate_kwargs: Any,
) -> list[str]:
    """Decode a continuation for each prompt, in batches, and return the reference's responses.

    Decoding defaults to the reference's (:data:`REFERENCE_GENERATION`: 4 beams, 32 new
    tokens, no sampling, no stop at EOS); ``generate_kwargs`` override it (e.g. ``num_beams=1``
    for greedy, ``eos_token_id=...`` to stop at EOS).
    Prompts are padded on the LEFT with an attention mask so that every prompt's last token
    sits at the end of the batch and the new tokens of a short prompt are not conditioned on
    pad tokens; the result therefore does not depend on ``batch_size``. The tokenizer's
    ``padding_side`` (and pad token, which falls back to EOS when missing) is restored
    afterwards, and so is the model's train/eval mode.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer.
        prompts: prompt strings (e.g. from :func:`format_prompt`).
        batch_size: prompts per ``generate`` call (the reference's 1 by default).
        **generate_kwargs: forwarded to ``model.generate`` over the reference's settings.

    Returns:
        One :func:`response_text` per prompt (special tokens skipped when decoding).
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

    kwargs = {**REFERENCE_GENERATION, "pad_token_id": tokenizer.pad_token_id, **generate_kwargs}
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
                generated = model.generate(**inputs, **kwargs)
            full = tokenizer.batch_decode(generated, skip_special_tokens=True)
            new = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs.extend(response_text(f, n) for f, n in zip(full, new))
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
    batch_size: int = REFERENCE_EVAL_BATCH_SIZE,
    return_predictions: bool = False,
    style: str = DEFAULT_PROMPT_STYLE,
    pattern: "str | re.Pattern | None" = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generation-based accuracy on one commonsense test set.

    Each example is rendered with :func:`format_prompt` (the evaluation prompt of ``style``),
    answered with :func:`generate_answers`, and scored by comparing :func:`extract_answer` with
    the gold ``answer``; a response without any answer-shaped string counts as wrong.

    Args:
        model, tokenizer: the model under test.
        examples: rows with ``instruction`` and ``answer`` (``input`` optional),
            e.g. from :func:`load_commonsense_split`.
        dataset: test-set name, selects the answer regex.
        batch_size, **generate_kwargs: see :func:`generate_answers`.
        return_predictions: also return the per-example ``predictions``
            (extracted answers) and the ``responses`` they came from.
        style: prompt template, a key of :data:`PROMPT_STYLES`.
        pattern: the answer regex (see :func:`extract_answer`); None: the set's own, by name.

    Returns:
        ``{"accuracy", "correct", "total", "no_match"}`` (plus
        ``predictions``/``responses`` when requested).
    """
    name = _canonical_dataset(dataset) if pattern is None else dataset  # fail before spending time generating
    if isinstance(pattern, str):
        pattern = re.compile(pattern)
    rows = [dict(ex) for ex in examples]
    if not rows:
        raise ValueError(f"no examples to evaluate for {name}")
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "answer") if k not in row]
        if missing:
            raise KeyError(f"example {i} of {name} lacks {missing}")

    prompts = [format_prompt(r["instruction"], r.get("input"), style=style) for r in rows]
    responses = generate_answers(model, tokenizer, prompts, batch_size=batch_size, **generate_kwargs)
    predictions = [extract_answer(name, g, pattern) for g in responses]
    correct = sum(p is not None and p == str(r["answer"]).strip() for p, r in zip(predictions, rows))
    result: dict[str, Any] = {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "no_match": sum(p is None for p in predictions),
    }
    if return_predictions:
        result["predictions"] = predictions
        result["responses"] = responses
    return result


# --------------------------------------------------------------------------- data


def load_commonsense_split(
    path_or_file: str | os.PathLike,
    cache_dir: str | None = None,
    required: Sequence[str] = ("instruction", "answer"),
):
    """Load an LLM-Adapters json file (a list of instruction records).

    Args:
        path_or_file: a json file such as ``commonsense_170k.json`` or
            ``dataset/boolq/test.json``, or a directory containing ``test.json``.
        cache_dir: optional ``datasets`` cache directory.
        required: the columns the records must have: a test set's ``instruction`` and ``answer``
            (the default); a training file needs ``instruction`` and ``output``.

    Returns:
        A ``datasets.Dataset`` with at least the ``required`` columns.

    Raises:
        FileNotFoundError: when the file does not exist (the message says
            where to get it).
        ValueError: when a ``required`` column is missing.
    """
    path = os.path.expanduser(os.fspath(path_or_file))
    if os.path.isdir(path):
        path = os.path.join(path, "test.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"commonsense data file not found: {path}. {_DOWNLOAD_HINT}")

    import datasets

    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path} lacks required column(s) {missing}; found {ds.column_names}. "
            f"Expected records with {', '.join(required)} (LLM-Adapters: instruction, input, output, answer)."
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
