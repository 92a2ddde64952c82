"""The offline demo task: short product reviews whose sentiment needs more than keywords.

Deterministic (a seeded generator, no files, no download). Each review is one of

* ``the {aspect} is {adj}.``                                  -> polarity of adj
* ``the {aspect} is not {adj}.``                              -> flipped
* ``the {a1} is {adj1}, but the {a2} is [not] {adj2}.``       -> the clause after "but"
* ``although the {a1} is {adj1}, the {a2} is [not] {adj2}.``  -> the main clause
* ``the {a1} is [not] {adj1}, the {a2} is [not] {adj2} and the {a3} is [not] {adj3}.``
  -> the majority of the three clauses

so a bag of words cannot solve it (the same words carry both labels): a model must read
negation and which clause governs. Labels are balanced (majority baseline 50 %).

The test split uses only adjectives that never occur in train or validation ("wonderful",
"dreadful", ...): its accuracy measures how much of the pretrained model's word knowledge the
adaptation keeps, so it does not saturate the way the in-vocabulary validation split does.
"""

from __future__ import annotations

import random

import datasets

from .base import BUILDERS

ASPECTS = [
    "battery",
    "screen",
    "camera",
    "keyboard",
    "speaker",
    "price",
    "design",
    "service",
    "charger",
    "software",
    "case",
    "delivery",
]
POSITIVE = ["great", "excellent", "reliable", "superb", "pleasant", "solid", "fast", "bright"]
NEGATIVE = ["awful", "poor", "terrible", "flimsy", "disappointing", "slow", "dim", "broken"]
# held out: only the test split uses these
UNSEEN_POSITIVE = ["wonderful", "outstanding", "lovely", "impressive", "fantastic", "sturdy"]
UNSEEN_NEGATIVE = ["horrible", "dreadful", "mediocre", "useless", "faulty", "sluggish"]


def _clause(rng: random.Random, aspect: str, unseen: bool) -> tuple[str, int]:
    positive = rng.random() < 0.5
    words = (UNSEEN_POSITIVE if positive else UNSEEN_NEGATIVE) if unseen else (POSITIVE if positive else NEGATIVE)
    adj = rng.choice(words)
    negated = rng.random() < 0.35
    label = int(positive != negated)
    return f"the {aspect} is {'not ' if negated else ''}{adj}", label


def review(rng: random.Random, unseen: bool = False) -> tuple[str, int]:
    a1, a2, a3 = rng.sample(ASPECTS, 3)
    kind = rng.randrange(4)
    first, l1 = _clause(rng, a1, unseen)
    if kind == 0:
        return first + ".", l1
    second, l2 = _clause(rng, a2, unseen)
    if kind == 1:
        return f"{first}, but {second}.", l2
    if kind == 2:
        return f"although {first}, {second}.", l2
    third, l3 = _clause(rng, a3, unseen)
    return f"{first}, {second} and {third}.", int(l1 + l2 + l3 >= 2)


def build(n_train: int = 1000, n_validation: int = 400, n_test: int = 400, seed: int = 0) -> datasets.DatasetDict:
    """Generate the demo splits; the same arguments always give the same data."""
    rng = random.Random(seed)
    splits = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        rows = [review(rng, unseen=split == "test") for _ in range(n)]
        splits[split] = datasets.Dataset.from_dict(
            {"sentence": [r[0] for r in rows], "label": [r[1] for r in rows]},
            features=datasets.Features(
                {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
            ),
        )
    return datasets.DatasetDict(splits)


BUILDERS["pilora-demo"] = build
