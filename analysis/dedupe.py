"""Which records are averaged together: duplicates and records of different code.

Two records with the same ``config_key`` (:mod:`analysis.keys`) *and* seed are duplicates (e.g. an
r' sweep point that repeats the main run through ``method.importance_from``);
:func:`drop_duplicates` keeps one (the one that ran its own stage 1, else the newest) and says which
it ignored. :func:`check_revisions` keeps one git revision's records, or warns when records
averaged together come from different code.
"""

from __future__ import annotations

import pandas as pd

from .rows import say


def _revision_label(rev, dirty) -> str:
    return (str(rev)[:10] if isinstance(rev, str) and rev else "unknown") + (" (dirty)" if dirty is True else "")


def check_revisions(df: pd.DataFrame, revision: str | None = None, quiet: bool = False) -> pd.DataFrame:
    """``revision`` (a hash or its prefix): keep only that git revision's records. Otherwise warn
    when records averaged together (one configuration, several seeds) come from different git
    revisions or from a tree with uncommitted changes (``git.dirty``): their code may differ.
    The configurations concerned are listed in ``df.attrs["mixed_revisions"]``, the filter's counts
    in ``df.attrs["revision"]``."""
    if df.empty:
        df.attrs.setdefault("mixed_revisions", [])
        return df
    revs = df["git_revision"].where(df["git_revision"].notna(), None)
    if revision:
        keep = revs.map(lambda r: isinstance(r, str) and r.startswith(revision))
        out = df[keep.astype(bool)].reset_index(drop=True)
        out.attrs.update(df.attrs)
        out.attrs["mixed_revisions"] = []
        out.attrs["revision"] = {"revision": revision, "kept": len(out), "of": len(df)}
        if not quiet:
            present = sorted({_revision_label(r, None) for r in revs})
            say(
                f"note: --revision {revision}: {len(out)} of {len(df)} record(s) kept"
                + ("" if len(out) else f"; the records' revisions are {', '.join(present)}")
            )
        return out
    mixed = []
    for key, group in df.groupby("config_key", sort=True):
        if len(group) < 2:
            continue
        labels = sorted({_revision_label(r, d) for r, d in zip(group["git_revision"], group["git_dirty"])})
        if len(labels) > 1 or any(d is True for d in group["git_dirty"]):
            first = group.iloc[0]
            mixed.append(
                {
                    "config_key": key,
                    "revisions": labels,
                    "paths": list(group["path"]),
                    "what": f"{first['task']}/{first['model']}/{first['method']}",
                }
            )
    if mixed and not quiet:
        say(
            f"warning: {len(mixed)} configuration(s) average records from different code (other git "
            "revisions, or a tree with uncommitted changes):"
        )
        for m in mixed:
            say(f"  {m['what']} [{m['config_key']}]: {', '.join(m['revisions'])}: {', '.join(map(str, m['paths']))}")
        say("  pass --revision REV to use one revision's records, or rerun them from one committed revision")
    df.attrs["mixed_revisions"] = mixed
    return df


def drop_duplicates(df: pd.DataFrame, quiet: bool = False) -> pd.DataFrame:
    """Keep one record per (config_key, seed): the one that ran its own stage 1, else the newest."""
    if df.empty:
        df.attrs.setdefault("duplicates", [])
        return df
    order = df.assign(_reused=df["importance_from"].notna(), _mtime=df["mtime"].fillna(0).astype(float))
    order = order.sort_values(["_reused", "_mtime", "path"], ascending=[True, False, True])
    dup = order.duplicated(["config_key", "seed"], keep="first")
    dropped = []
    for idx in order.index[dup]:
        twin = order[(order.config_key == df.at[idx, "config_key"]) & (order.seed == df.at[idx, "seed"]) & ~dup]
        dropped.append((df.at[idx, "path"], twin["path"].iloc[0]))
        if not quiet:
            say(f"note: ignoring {df.at[idx, 'path']}: same configuration and seed as {twin['path'].iloc[0]}")
    out = df.drop(index=order.index[dup]).reset_index(drop=True)
    out.attrs.update(df.attrs)
    out.attrs["duplicates"] = dropped
    return out
