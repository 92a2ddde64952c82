"""Analysis of PiLoRA run records: the paper's tables and figures from ``results.json`` files.

* :mod:`analysis.records` -- ``load_records`` (a local results tree) and ``load_wandb`` (a W&B
  project, cached locally) into one pandas DataFrame, one row per job;
* :mod:`analysis.tables` -- Tables 1-4, ours beside the paper's numbers
  (``analysis/paper_numbers.json``), Markdown or LaTeX (``python -m analysis.tables``);
* :mod:`analysis.figures` -- Figures 2-8 (``python -m analysis.figures``).

Nothing here imports torch unless a figure needs the stage-1 statistics.
"""

__all__ = ["config_key", "load_records", "load_wandb", "score"]


def __getattr__(name):  # lazy, so `python -m analysis.records` does not import itself twice
    if name in __all__:
        from . import records

        return getattr(records, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
