"""What a table is made of: the paper's numbers, one cell's statistics, rows and tables."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field

import pandas as pd

from pilora.methods import table_rows

from .keys import same_value

PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_numbers.json")
TABLE_IDS = ("1", "2", "3", "4")
# Row names come from the methods themselves (each registered Method's ``rows``), so a new method's
# rows are named in every table without an entry here. The order is the paper's; rows it does not
# list (methods added later) follow, by id.
METHOD_ORDER = ["full", "lora", "lora_matched", "rslora", "dora", "pissa", "milora", "lora_dash", "pilora"]


def method_name(row: str) -> str:
    """A row's name in the tables: its method's ``rows`` entry (the id when no method declares it)."""
    return table_rows().get(row, row)


MODEL_NAMES = {
    "llama2-7b": "LLaMA2-7B",
    "llama3-8b": "LLaMA3-8B",
    "roberta-large": "RoBERTa-large",
    "clip-vit-b32": "CLIP ViT-B/32",
}
KEY_NAMES = {
    "method.r": "r",
    "method.supplementary_r": "r'",
    "method.alpha": "α",
    "method.supplementary_alpha": "α'",
    "method.partition.name": "partition",
    "method.stage1_r": "stage-1 r",
    "method.importance_interval": "K",
    "method.stage1.max_steps": "stage-1 steps",
    "method.stage1.epochs": "stage-1 epochs",
    "trainer.learning_rate": "lr",
    "trainer.num_train_epochs": "epochs",
    "trainer.max_steps": "max_steps",
    "trainer.per_device_train_batch_size": "batch",
}
DASH = "—"


def load_paper(path: str = PAPER_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


def mismatched_keys(reference: dict, config: dict) -> list[str]:
    """The keys of a paper setting (a table's ``reference`` for one model) that ``config`` sets
    to another value; a key ``config`` lacks does not count."""
    return [k for k in reference if k in config and not same_value(config[k], reference[k])]


def off_paper_setting(model: str, config: dict, paper: dict | None = None) -> int:
    """How many keys of the paper's setting for ``model`` (a table's ``reference`` in
    paper_numbers.json; the fewest over the tables that name it) ``config`` contradicts."""
    refs = [
        spec["reference"][model]
        for spec in (paper or load_paper())["tables"].values()
        if model in (spec.get("reference") or {})
    ]
    return min((len(mismatched_keys(ref, config)) for ref in refs), default=0)


# ----------------------------------------------------------------------------- data


@dataclass
class Stat:
    """Values (percent) of one cell, one per seed."""

    values: list[float]
    seeds: list = field(default_factory=list)
    per_column_n: tuple | None = None  # set for a pooled average: (fewest, most) seeds of a column

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; ``None`` for one seed or a pooled average."""
        return statistics.stdev(self.values) if self.n > 1 and self.per_column_n is None else None

    def fmt(self, d: int) -> str:
        if self.per_column_n is not None:
            lo, hi = self.per_column_n
            return f"{self.mean:.{d}f} (n={lo if lo == hi else f'{lo}–{hi}'} per column)"
        if self.n > 1:
            return f"{self.mean:.{d}f} ± {self.std:.{d}f} (n={self.n})"
        return f"{self.mean:.{d}f} (n=1)"


@dataclass
class Row:
    model: str  # display name
    method: str  # display label
    paper: dict | None = None  # the paper's row, if this row is one
    model_config: str | None = None
    row_id: str | None = None
    label: str = ""  # what distinguishes this configuration (extra rows)
    cells: dict = field(default_factory=dict)  # column key -> Stat | None
    avg: Stat | None = None
    params: list = field(default_factory=list)  # ours, percent, one per record
    params_other: list = field(default_factory=list)  # the same on the other basis (all vs backbone parameters)
    groups: list = field(default_factory=list)  # (task, config_key, seeds, paths)
    residual: list = field(default_factory=list)  # budget-matched LoRA: residual share (%), one per record
    records: pd.DataFrame | None = None  # the row's records (cost table)
    best: set = field(default_factory=set)  # column keys (and "avg") marked as a clear win

    @property
    def has_ours(self) -> bool:
        return any(v is not None for v in self.cells.values())


# the two bases of "# Params (%)", each printed beside the other (the paper mixes them: Tab. 2 counts
# against the backbone, Tab. 3 against all parameters)
PARAMS_BASES = {
    "adapter_share": "100 × adapter / all parameters",
    "adapter_share_of_backbone": "100 × adapter / backbone parameters",
}
OTHER_BASIS = {"adapter_share": "adapter_share_of_backbone", "adapter_share_of_backbone": "adapter_share"}


@dataclass
class Table:
    id: str
    spec: dict
    rows: list
    which: str
    params_basis: str
    n_records: int

    @property
    def columns(self) -> list[dict]:
        return self.spec["columns"]

    @property
    def decimals(self) -> int:
        return int(self.spec.get("decimals", 2))


# ----------------------------------------------------------------------------- building
