"""Analysis of PiLoRA run records: the paper's tables and figures from ``results.json`` files.

* :mod:`analysis.records` -- ``load_records`` (a local results tree) into one pandas DataFrame,
  one row per job, and its command line; :mod:`analysis.wandb_source` -- ``load_wandb`` (a W&B
  project, cached locally) into the same frame; :mod:`analysis.keys` (configuration identity),
  :mod:`analysis.rows` (record -> row), :mod:`analysis.dedupe` (duplicates, git revisions) and
  :mod:`analysis.scores` (the headline score) hold the parts;
* :mod:`analysis.tables` -- Tables 1-4, ours beside the paper's numbers
  (``analysis/paper_numbers.json``), Markdown or LaTeX (``python -m analysis.tables``);
* :mod:`analysis.figures` -- Figures 2-8 (``python -m analysis.figures``).

Nothing here imports torch unless a figure needs the stage-1 statistics.
"""

__all__ = ["config_key", "load_records", "load_wandb", "score"]


_HOME = {"config_key": "keys", "load_records": "records", "load_wandb": "wandb_source", "score": "scores"}


def __getattr__(name):  # lazy, so `python -m analysis.records` does not import itself twice
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
