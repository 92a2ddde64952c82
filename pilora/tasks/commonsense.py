"""Commonsense reasoning with a causal LM (the LLM-Adapters / DoRA protocol).

The protocol is the generation family's defaults (:mod:`pilora.tasks.generation`), and its task is
``conf/task/commonsense/commonsense170k.yaml``: the eight test sets, each scored with its own
LLM-Adapters answer regex (:data:`pilora.tasks.llm_adapters.ANSWER_PATTERNS`). The names below are
kept for code that imports them from here.
"""

from __future__ import annotations

from .generation import (  # noqa: F401  (the names this module has always had)
    EVAL_WEIGHTS,
    GenerationSettings,
    GenerationTask,
    check_test_file,
    pretrained_fp16,
    write_predictions,
)

# the generation family's class: commonsense170k is one of its tasks
CommonsenseTask = GenerationTask
