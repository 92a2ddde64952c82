"""Run records -> one pandas DataFrame (one row per job).

Every job writes ``<output_dir>/results.json`` (schema 1, :mod:`pilora.runner.records`). ``load_records``
walks one or more results trees (Hydra's ``outputs/`` and ``multirun/`` by default) and flattens
each record into a row; ``load_wandb`` builds the same frame from a W&B project, pulled once into
a local JSON cache that it falls back to when the API cannot be reached.

The jobs behind it, one module each (their names stay importable from here):

* :mod:`analysis.keys` -- configuration identity (``config_key``, :data:`~analysis.keys.IGNORED`):
  records are averaged over seeds only within one ``config_key``;
* :mod:`analysis.rows` -- one record -> one checked, flat row (``record_row``, ``frame``);
* :mod:`analysis.dedupe` -- duplicates of one (configuration, seed) and records of different git
  revisions (``drop_duplicates``, ``check_revisions``);
* :mod:`analysis.scores` -- the headline number of a record (``score``, ``score_label``);
* :mod:`analysis.wandb_source` -- records from a W&B project (API and cache) or offline run folders.

Command line (lists records; ``--value`` prints one field, e.g. a stage-1 file to reuse)::

    python -m analysis.records --root multirun/table1_llama2 \
        --query "method == 'pilora' and seed == 0" --value importance_file
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pandas as pd

from pilora.runner.records import find_records, is_rescoring

from .dedupe import check_revisions, drop_duplicates
from .keys import IGNORED, config_items, config_key, flatten, partition_label
from .rows import BASE_COLUMNS, METRIC_RANGES, NUMERIC, RecordError, frame, record_row, say
from .scores import score, score_label
from .wandb_source import WandbSourceError, load_wandb, load_wandb_dir, parse_wandb_path, wandb_record

__all__ = [
    "BASE_COLUMNS",
    "DEFAULT_ROOTS",
    "IGNORED",
    "METRIC_RANGES",
    "NUMERIC",
    "RecordError",
    "WandbSourceError",
    "add_source_args",
    "check_revisions",
    "config_items",
    "config_key",
    "drop_duplicates",
    "find_record_files",
    "flatten",
    "frame",
    "load_records",
    "load_source",
    "load_wandb",
    "load_wandb_dir",
    "parse_wandb_path",
    "partition_label",
    "record_row",
    "say",
    "score",
    "source_notes",
    "score_label",
    "wandb_record",
]

DEFAULT_ROOTS = ("outputs", "multirun")


# ----------------------------------------------------------------------------- local trees


def _as_list(roots) -> list[str]:
    if roots is None:
        return list(DEFAULT_ROOTS)
    if isinstance(roots, (str, os.PathLike)):
        return [os.fspath(roots)]
    return [os.fspath(r) for r in roots]


def find_record_files(roots) -> list[str]:
    """Every ``results.json`` under ``roots`` (a folder, a list, or ``None`` for the defaults)."""
    return find_records(_as_list(roots))


def load_records(roots=None, *, dedupe: bool = True, quiet: bool = False) -> pd.DataFrame:
    """All usable records under ``roots`` (a folder, a list of folders, or ``None`` for
    ``outputs/`` and ``multirun/``) as one DataFrame; unusable files are skipped with one warning
    line each (also listed in ``df.attrs["skipped"]``)."""
    roots = _as_list(roots)
    rows, skipped, rescored = [], [], []
    missing = [r for r in roots if not os.path.exists(r)]
    for path in find_record_files([r for r in roots if os.path.exists(r)]):
        try:
            with open(path) as f:
                rec = json.load(f)
            if is_rescoring(rec):  # the run's own record is what the tables average
                rescored.append(path)
                continue
            rows.append(record_row(rec, path))
        except (OSError, json.JSONDecodeError) as err:
            skipped.append((path, f"unreadable ({type(err).__name__}: {err})"))
        except RecordError as err:
            skipped.append((path, str(err)))
        except Exception as err:  # a record of an unexpected shape must not stop the others
            skipped.append((path, f"unexpected content ({type(err).__name__}: {err})"))
    if not quiet:
        for path, why in skipped:
            say(f"warning: skipping {path}: {why}")
        if rescored:
            say(
                f"note: {len(rescored)} re-scoring record(s) of python -m pilora.runner.evaluate left out "
                f"(e.g. {rescored[0]}); the tables read each run's own results.json"
            )
    df = frame(rows)
    if dedupe:
        df = drop_duplicates(df, quiet=quiet)
    if not quiet and df.empty:
        where = ", ".join(roots)
        extra = f" ({', '.join(missing)}: no such folder)" if missing else ""
        say(
            f"no usable results.json records under {where}{extra}; run the experiments first "
            "(experiments/README.md) or point --root at a results tree"
        )
    df.attrs.update(roots=roots, skipped=skipped, missing_roots=missing, rescored=rescored)
    return df


# ----------------------------------------------------------------------------- CLI


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The record-source options shared by ``analysis.tables`` and ``analysis.figures``."""
    p.add_argument("--root", action="append", help="results tree (repeatable; default outputs/ and multirun/)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the records from this W&B project (public API)")
    p.add_argument("--wandb-dir", metavar="DIR", help="read the records from the offline W&B runs below DIR")
    p.add_argument("--wandb-project", help=argparse.SUPPRESS)  # older spelling of --wandb
    p.add_argument("--wandb-entity", help=argparse.SUPPRESS)
    p.add_argument("--wandb-cache", help="W&B cache folder (default $PILORA_WANDB_CACHE or .wandb_cache)")
    p.add_argument("--refresh", action="store_true", help="pull the W&B project again")
    p.add_argument("--revision", metavar="REV", help="use only the records of this git revision (hash or prefix)")


def load_source(args) -> pd.DataFrame:
    """Records from ``--wandb`` / ``--wandb-dir`` / ``--root`` (raises :class:`WandbSourceError`),
    of one ``--revision`` if given (else a warning when averaged records come from different code),
    one per configuration and seed; ``df.attrs["notes"]``: :func:`source_notes`."""
    if args.wandb_dir:
        df = load_wandb_dir(args.wandb_dir, dedupe=False)
    elif args.wandb or args.wandb_project:
        entity, project = parse_wandb_path(args.wandb) if args.wandb else (args.wandb_entity, args.wandb_project)
        df = load_wandb(project, entity, args.wandb_cache, refresh=args.refresh, dedupe=False)
    else:
        df = load_records(args.root, dedupe=False)
    revision = getattr(args, "revision", None)
    if revision:  # first: of two duplicates, the one kept may be of another revision
        df = drop_duplicates(check_revisions(df, revision))
    else:
        df = check_revisions(drop_duplicates(df))
    df.attrs["notes"] = source_notes(df.attrs)
    return df


def _folder(path: str) -> str:
    """A record's folder (a W&B run: its label)."""
    return os.path.dirname(path) if str(path).endswith(".json") else str(path)


def _listed(items: list[str], most: int = 10) -> str:
    more = len(items) - most
    return "; ".join(items[:most]) + (f"; and {more} more (stderr lists each)" if more > 0 else "")


def source_notes(attrs: dict) -> list[str]:
    """What loading the records said on stderr, from a frame's ``attrs``: folders that do not exist,
    a ``--revision`` filter, records skipped, duplicates and re-scorings left out, configurations
    averaging records of different git revisions. :func:`load_source` keeps them in
    ``df.attrs["notes"]`` and :func:`analysis.tables.render` prints them under the tables, so that a
    saved table (``--out``, a notebook) says it too: a cell with n=2 may be three seeds, one failed."""
    out = []
    if attrs.get("missing_roots"):
        out.append(f"No such folder: {', '.join(attrs['missing_roots'])}.")
    if attrs.get("revision"):
        rev = attrs["revision"]
        out.append(f"--revision {rev['revision']}: {rev['kept']} of {rev['of']} record(s) used.")
    if attrs.get("skipped"):
        skipped = [f"{_folder(p)} ({why})" for p, why in attrs["skipped"]]
        out.append(f"{len(skipped)} record(s) skipped, in no table: {_listed(skipped)}.")
    if attrs.get("duplicates"):
        dups = [f"{_folder(p)} (kept: {_folder(kept)})" for p, kept in attrs["duplicates"]]
        out.append(f"{len(dups)} duplicate(s) of a configuration and seed left out: {_listed(dups)}.")
    if attrs.get("rescored"):
        again = [_folder(p) for p in attrs["rescored"]]
        out.append(
            f"{len(again)} re-scoring record(s) of python -m pilora.runner.evaluate left out (each run's own "
            f"record is used): {_listed(again)}."
        )
    # named by configuration, not folder: the same records read from W&B give the same text. One
    # revision with uncommitted changes (every record of a working copy) stays a stderr warning.
    mixed = [
        f"{m['what']} [{m['config_key']}]: {', '.join(m['revisions'])}"
        for m in attrs.get("mixed_revisions") or []
        if len(m["revisions"]) > 1
    ]
    if mixed:
        out.append(
            f"{len(mixed)} configuration(s) average records of different git revisions (stderr lists their "
            f"folders; --revision REV uses one): {_listed(mixed)}."
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="List run records (one row per job).")
    p.add_argument("--root", action="append", help="results tree (repeatable; default outputs/ and multirun/)")
    p.add_argument("--query", help="pandas query, e.g. \"method == 'pilora' and seed == 0\"")
    p.add_argument(
        "--columns",
        default="task,model,method,seed,r,supplementary_r,partition_label,"
        "dominant_fraction,adapter_share,config_key,path",
    )
    p.add_argument("--value", help="print only this column of the first matching record (for scripts)")
    p.add_argument("--which", default="best", choices=["best", "final"])
    args = p.parse_args(argv)
    df = load_records(args.root, quiet=bool(args.value))
    if not df.empty:
        df["score"] = score(df, args.which)
    if args.query and not df.empty:
        df = df.query(args.query)
    if args.value:
        if df.empty or args.value not in df.columns:
            say(f"no matching record with a {args.value!r} field")
            return 1
        print(df[args.value].iloc[0])
        return 0
    cols = [c for c in args.columns.split(",") if c in df.columns] + (["score"] if "score" in df.columns else [])
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
        print(df[cols].to_string(index=False) if not df.empty else "(no records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
