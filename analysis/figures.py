"""Figures 2-8 of the paper from run records and stage-1 statistics.

    python -m analysis.figures --root multirun --out figures/
    python -m analysis.figures --stats multirun/x/importance.pt --layers 0 15 31 --out figures/

=========================  ==============================================================  ===================
figure                     drawn from                                                      function
=========================  ==============================================================  ===================
Fig. 2 / 7 / 8             the G̃ snapshot (mean |G̃|, a ≤ 256×256 crop) in an importance.pt  ``gradient_heatmaps``
                           (Fig. 2: last layer; Fig. 7 (LLaMA2) / 8 (LLaMA3): more layers)
Fig. 3                     dominant / supplementary rows of one layer, one row per dataset  ``partition_patterns``
Fig. 4                     accuracy vs r' (``method.supplementary_r``)                      ``fig_rprime``
Fig. 5                     accuracy vs dominant rank (``method.r``, r' fixed)               ``fig_rank``
Fig. 6                     accuracy vs cumulative threshold (``partition=cumulative``)      ``fig_group_size``
=========================  ==============================================================  ===================

Every function returns a matplotlib Figure. When its input is missing (no records, no sweep, no
statistics file, no such module) it prints one line saying what is missing and returns a figure
that shows the same message, with ``fig.missing_input`` set to it; :func:`save` and the command
line skip such figures. Accuracy is the records' headline score (:func:`analysis.scores.score`),
mean ± sample std over seeds, one line per (task, model, configuration of everything else); a
record scored on only some of its task's test sets (Table 1's eight) is left out with a warning.
Figs. 4-6 also draw the budget-matched LoRA (``method=lora_matched``, run by the same sweeps) as a
dotted line with square markers: at each point, LoRA with that point's PiLoRA parameter budget.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .keys import at_default
from .records import add_source_args, load_records, load_source  # noqa: F401
from .rows import say
from .scores import score
from .table_model import load_paper, off_paper_setting
from .wandb_source import WandbSourceError

_LAYER = re.compile(r"\.(\d+)\.")


# ----------------------------------------------------------------------------- helpers


def message_figure(msg: str) -> plt.Figure:
    """Print ``msg`` and return a small figure showing it (``fig.missing_input = msg``)."""
    say(msg)
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, msg, ha="center", va="center", wrap=True, fontsize=9)
    fig.missing_input = msg
    return fig


def save(fig: plt.Figure, out_dir: str, name: str) -> list[str]:
    """Write ``<out_dir>/<name>.png`` and ``.pdf``; nothing for a missing-input figure."""
    if getattr(fig, "missing_input", None):
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def split_name(name: str) -> tuple[int | None, str]:
    """``...layers.11.self_attn.q_proj`` -> ``(11, "self_attn.q_proj")``."""
    m = _LAYER.search(name)
    if not m:
        return None, name
    return int(m.group(1)), name[m.end() :]


def load_stats(stats):
    """An ``ImportanceStats`` from itself or from a path (``pilora.ImportanceStats.load``)."""
    if stats is None or isinstance(stats, (str, os.PathLike)):
        if stats is None or not os.path.exists(stats):
            return None
        from pilora import ImportanceStats

        return ImportanceStats.load(stats)
    return stats


def default_module(names: list[str], targets=None) -> str | None:
    """The last layer's first target module: first in ``targets`` (the config's
    ``model.target_modules`` order, e.g. q_proj) when given, else first as stored."""
    if not names:
        return None
    layered = [(split_name(n)[0], n) for n in names]
    last = max((l for l, _ in layered if l is not None), default=None)
    in_last = [n for l, n in layered if l == last] if last is not None else list(names)
    for t in targets or []:
        hit = next((n for n in in_last if n == t or n.endswith("." + t)), None)
        if hit:
            return hit
    return in_last[0]


def _importance_path(rec: pd.Series) -> str | None:
    """The record's importance file, or the copy next to the record if the tree was moved."""
    path = rec.get("importance_file")
    if isinstance(path, str) and os.path.exists(path):
        return path
    local = os.path.join(rec["dir"], "importance.pt") if isinstance(rec.get("dir"), str) else None
    return local if local and os.path.exists(local) else None


def pick_pilora_records(df: pd.DataFrame, partition: str | None = "hit_frequency") -> pd.DataFrame:
    """One PiLoRA record per (model, task) with readable statistics: of the given partition
    strategy, in the paper's setting of its table (paper_numbers.json's ``reference``: e.g. r = 8,
    r' = 1 for RoBERTa-large, not a table2_glue_r32 run beside it), the lowest seed, preferring
    runs that made their own stage 1."""
    if df is None or df.empty:
        return pd.DataFrame()
    sub = df[df["method"] == "pilora"].copy()
    if partition is not None and not sub.empty:
        sub = sub[sub["partition"] == partition]
    if sub.empty:
        return sub
    sub["_stats"] = [_importance_path(r) for _, r in sub.iterrows()]
    sub = sub[sub["_stats"].notna()]
    paper = load_paper()
    off = [off_paper_setting(r["model"], r.get("config") or {}, paper) for _, r in sub.iterrows()]
    sub = sub.assign(_reused=sub["importance_from"].notna(), _off_paper=off)
    sub = sub.sort_values(["model", "task", "_off_paper", "seed", "_reused", "path"])
    return sub.groupby(["model", "task"], sort=True).head(1)


# ----------------------------------------------------------------------------- Fig. 2 / 7 / 8


def heatmap_sources(df: pd.DataFrame) -> list[tuple[str, str]]:
    """``(model_task, importance.pt)``: one stage-1 file per model, from its PiLoRA records."""
    picked = pick_pilora_records(df, None)
    if picked.empty:
        return []
    return [(f"{r['model']}_{r['task']}", r["_stats"]) for _, r in picked.groupby("model").head(1).iterrows()]


def _coverage(s, grid) -> str:
    """What a snapshot panel shows: a crop of the matrix, or all of it pooled onto the grid."""
    (m, n), (wm, wn) = s.shape, s.window
    if (wm, wn) != (m, n):
        return f"rows 0-{wm - 1}, cols 0-{wn - 1} of {m}×{n}"
    return f"{m}×{n}" + ("" if tuple(grid) == (m, n) else f" pooled to {grid[0]}×{grid[1]}")


def gradient_heatmaps(
    stats, layers=None, targets=None, title: str | None = None, shared_scale: bool = False
) -> plt.Figure:
    """Heat maps of the G̃ snapshot: rows = layers, columns = target modules.

    ``stats``: an ``ImportanceStats`` or a path to ``importance.pt``. ``layers``: layer indices,
    ``"last"`` (default, Fig. 2), ``"spread"`` (first / middle / last, Fig. 7/8) or ``"all"``.
    ``targets``: substrings selecting the module types (default: every target of the layer).
    Each panel shows the mean |G̃| per check on the stored grid (output neurons down, input features
    across), with its own colour scale: by default the first ≤ 256 rows × 256 columns, one neuron
    per row, as the paper draws "a subset of the weights" (``method.snapshot_window=pool``: the
    whole matrix averaged onto the grid). The panel's title says which.
    """
    label = stats if isinstance(stats, (str, os.PathLike)) else None
    try:
        stats = load_stats(stats)
    except (ValueError, OSError) as err:
        return message_figure(f"gradient heat maps: {err}")
    if stats is None:
        return message_figure(
            f"gradient heat maps: no importance statistics file at {label!r} "
            "(a PiLoRA run writes importance.pt into its output folder)"
        )
    names = [n for n, s in stats.modules.items() if s.grad_snapshot is not None]
    if not names:
        return message_figure("gradient heat maps: these statistics hold no G̃ snapshot")
    by_layer: dict = {}
    for n in names:
        layer, target = split_name(n)
        by_layer.setdefault(layer, []).append((target, n))
    known = sorted(l for l in by_layer if l is not None) or [None]
    if layers is None or layers == "last":
        chosen = [known[-1]]
    elif layers == "spread":
        chosen = sorted({known[0], known[len(known) // 2], known[-1]}, key=lambda x: -1 if x is None else x)
    elif layers == "all":
        chosen = known
    else:
        chosen = [int(l) for l in layers]
        bad = [l for l in chosen if l not in by_layer]
        if bad:
            return message_figure(
                f"gradient heat maps: no layer {bad} in these statistics (layers {known[0]}..{known[-1]})"
            )
    panels = []
    for layer in chosen:
        mods = by_layer[layer]
        if targets:
            mods = [(t, n) for t, n in mods if any(s in n for s in targets)]
        panels.append((layer, mods))
    ncols = max((len(m) for _, m in panels), default=0)
    if ncols == 0:
        return message_figure(f"gradient heat maps: no module matches {list(targets or [])}")
    fig, axes = plt.subplots(len(panels), ncols, figsize=(2.6 * ncols, 2.5 * len(panels)), squeeze=False)
    vmin = vmax = None
    if shared_scale:  # one colour scale for every panel, so their magnitudes can be compared
        grids = [
            stats.modules[n].grad_snapshot.float() / max(int(stats.modules[n].checks), 1)
            for _, mods in panels
            for _, n in mods
        ]
        vmin, vmax = min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)
    for i, (layer, mods) in enumerate(panels):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(mods):
                ax.axis("off")
                continue
            target, name = mods[j]
            s = stats.modules[name]
            grid = s.grad_snapshot.float().numpy() / max(int(s.checks), 1)
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            ax.set_title(f"L{layer} {target}\n{_coverage(s, grid.shape)}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel("output neurons")
            if i == len(panels) - 1:
                ax.set_xlabel("input features")
    meta = getattr(stats, "meta", {}) or {}
    fig.suptitle(
        title or f"mean |G̃| during stage 1 — {meta.get('model', '')} {meta.get('task', '')}".strip(), fontsize=10
    )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- Fig. 3


def partition_patterns(
    df: pd.DataFrame,
    module: str | None = None,
    partition: str | None = "hit_frequency",
    tasks=None,
    max_neurons: int | None = None,
) -> plt.Figure:
    """Dominant (dark) / supplementary (light) rows of one layer, one row per dataset, one panel per
    model (Fig. 3). ``module``: a substring of the module name (default: the last layer's first
    target). One PiLoRA record per (model, task): the lowest seed with the given partition
    strategy (``None``: any); its mask is recomputed from its importance file and partition."""
    picked = pick_pilora_records(df, partition)
    if tasks is not None and not picked.empty:
        picked = picked[picked["task"].isin(list(tasks))]
    if picked.empty:
        return message_figure(
            "partition patterns: no PiLoRA record with a readable importance.pt"
            + (f" and partition {partition!r}" if partition else "")
        )
    from pilora.partition import partition as make_masks

    panels = []
    for model, recs in picked.groupby("model", sort=True):
        rows, name = [], None
        for _, rec in recs.iterrows():
            stats = load_stats(rec["_stats"])
            names = list(stats.modules)
            if name is None:
                targets = (rec["config"] or {}).get("model.target_modules")
                hits = [n for n in names if module in n] if module else [default_module(names, targets)]
                if not hits or hits[0] is None:
                    return message_figure(
                        f"partition patterns: no module of {model} contains {module!r} (e.g. {names[-1]!r})"
                    )
                name = hits[0]
            if name not in stats.modules:
                say(f"partition patterns: {rec['task']} has no module {name!r}; left out")
                continue
            one = type(stats)({name: stats.modules[name]}, stats.meta)
            mask = make_masks(one, rec["partition"], **(rec["partition_args"] or {}))[name].numpy()
            rows.append((rec["task"], mask))
        if rows:
            panels.append((model, name, rows))
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 0.45 * sum(len(r) for _, _, r in panels) + 1.2 * len(panels)), squeeze=False
    )
    for ax, (model, name, rows) in zip(axes[:, 0], panels):
        img = np.stack([m for _, m in rows]).astype(float)
        if max_neurons:
            img = img[:, :max_neurons]
        ax.imshow(img, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{t} ({100 * m.mean():.0f}%)" for t, m in rows], fontsize=8)
        ax.set_xlabel("output neuron" + (f" (first {max_neurons})" if max_neurons else ""))
        ax.set_title(f"{model}: {name} — dominant (dark) / supplementary (light)", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- Fig. 4 / 5 / 6


def eval_sets(paper: dict | None = None) -> dict[str, list[str]]:
    """Per task, the test sets its table columns read where it has several (commonsense170k:
    Table 1's eight): the fields a record's average must hold to be that table's average."""
    fields: dict[str, list[str]] = {}
    for spec in (paper or load_paper())["tables"].values():
        for c in spec["columns"]:
            fields.setdefault(c["task"], [])
            if c["field"] not in fields[c["task"]]:
                fields[c["task"]].append(c["field"])
    return {task: f for task, f in fields.items() if len(f) > 1}


def _complete(df: pd.DataFrame, title: str) -> pd.Series:
    """Which records' scores are over all of their task's :func:`eval_sets`. A record that holds
    only some of them (``task.eval_only=[boolq]``) averaged those alone: as Table 1 shows no Avg.
    without all eight, it is no point of the figure (left out with a warning naming it). A record
    that names no set at all (a summary of the average alone) cannot be checked and is kept."""
    sets = eval_sets()
    keep = pd.Series(True, index=df.index)
    for idx, rec in df.iterrows():
        want = sets.get(rec["task"], [])
        missing = [f for f in want if f not in rec or pd.isna(rec[f])]
        if missing and len(missing) < len(want):
            keep[idx] = False
            say(
                f"warning: {title}: leaving out {rec['path']}: its score averages {len(want) - len(missing)} of "
                f"{rec['task']}'s {len(want)} test sets (no {', '.join(missing)})"
            )
    return keep


def accuracy_vs(
    df: pd.DataFrame,
    x: str,
    swept: tuple,
    xlabel: str,
    title: str,
    which: str = "best",
    restrict=None,
    show_params: bool = True,
    what: str = "sweep",
) -> plt.Figure:
    """Accuracy (mean ± std over seeds) against record column ``x`` for PiLoRA records and the
    budget-matched LoRA records of the same sweep (dotted, squares); one line per (task, model,
    method, config without the ``swept`` keys); lines with < 2 values of ``x`` are dropped."""
    if df is None or df.empty:
        return message_figure(f"{title}: no records")
    sub = df[df["method"].isin(["pilora", "lora_matched"])]
    if restrict is not None:
        sub = sub[restrict(sub)] if not sub.empty else sub
    if x not in sub.columns or sub.empty:
        return message_figure(f"{title}: no PiLoRA records for the {what}")
    sub = sub[sub[x].notna()].copy()
    sub["_score"] = 100 * score(sub, which)
    sub = sub[sub["_score"].notna() & _complete(sub, title)]
    ignore = set(swept)
    # a key at its unset default (α' = α·r'/r where r varies) is no difference between the points
    sub["_line"] = [
        repr(sorted((k, repr(v)) for k, v in c.items() if k not in ignore and not at_default(c, k)))
        for c in sub["config"]
    ]
    lines = []
    for (task, model, method, _), g in sub.groupby(["task", "model", "method", "_line"], sort=True):
        if g[x].nunique() < 2:
            continue
        agg = (
            g.groupby(x)
            .agg(mean=("_score", "mean"), std=("_score", "std"), n=("_score", "size"), params=("adapter_share", "mean"))
            .sort_index()
        )
        lines.append((task, model, method, agg))
    lines.sort(key=lambda t: (t[0], t[1], t[2] != "pilora"))  # each PiLoRA line before its matched LoRA
    if not lines:
        return message_figure(
            f"{title}: no {what} found (PiLoRA records of one configuration that differ "
            f"only in {', '.join(swept[:1])}; see experiments/README.md)"
        )
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax2 = ax.twinx() if show_params else None
    labels = [
        f"{t} [{m}] " + ("LoRA (budget-matched)" if meth == "lora_matched" else "PiLoRA") for t, m, meth, _ in lines
    ]
    for i, (task, model, method, agg) in enumerate(lines):
        lab = labels[i] + (f" #{i}" if labels.count(labels[i]) > 1 else "")
        xs = agg.index.to_numpy(dtype=float)
        matched = method == "lora_matched"
        ax.errorbar(
            xs,
            agg["mean"],
            yerr=agg["std"].fillna(0),
            marker="s" if matched else "o",
            ls=":" if matched else "-",
            capsize=3,
            color=f"C{i}",
            label=lab,
        )
        for xv, (mean, n) in zip(xs, zip(agg["mean"], agg["n"])):
            if n > 1:
                # inside the axes: a label at the edge would be cut off (clip_on drops it instead)
                ax.annotate(
                    f"n={n}",
                    (xv, mean),
                    textcoords="offset points",
                    xytext=(3, 4),
                    fontsize=6,
                    annotation_clip=True,
                    clip_on=True,
                )
        if ax2 is not None and not matched and agg["params"].notna().any():  # matched: the same budget
            ax2.plot(xs, 100 * agg["params"], ls="--", color=f"C{i}", alpha=0.5, label=f"# Params (%) {lab}")
    xs_all = sorted({float(v) for _, _, _, a in lines for v in a.index})
    ax.set_xticks(xs_all)
    ax.set_xticklabels([f"{v:g}" for v in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    if ax2 is not None:
        ax2.set_ylabel("# Params (%) (dashed)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.1, y=0.15)  # room for the n= labels inside the axes
    handles, names = ax.get_legend_handles_labels()
    if ax2 is not None:  # the dashed # Params lines are in the legend too
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    # below the axes: inside them, loc="best" weighs only the accuracy axes' artists and can sit on
    # the twin axes' dashed # Params line (save() keeps the legend in the file: bbox_inches="tight")
    ax.legend(handles, names, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    return fig


def fig_rprime(df: pd.DataFrame, which: str = "best") -> plt.Figure:
    """Fig. 4: accuracy vs the supplementary rank r'."""
    return accuracy_vs(
        df,
        "supplementary_r",
        ("method.supplementary_r", "method.supplementary_alpha"),
        "supplementary rank r'",
        "Fig. 4: effect of r'",
        which,
        what="sweep over r'",
    )


def fig_rank(df: pd.DataFrame, which: str = "best") -> plt.Figure:
    """Fig. 5: accuracy vs the dominant rank r (r' fixed: it stays part of the line's config)."""
    return accuracy_vs(
        df,
        "r",
        ("method.r", "method.alpha", "method.stage1_r"),
        "dominant rank r",
        "Fig. 5: effect of the dominant rank",
        which,
        what="sweep over the dominant rank",
    )


def fig_group_size(df: pd.DataFrame, which: str = "best") -> plt.Figure:
    """Fig. 6: accuracy vs the cumulative-importance threshold of the ``cumulative`` partition."""
    return accuracy_vs(
        df,
        "partition_threshold",
        ("method.partition.args.threshold",),
        "cumulative importance threshold",
        "Fig. 6: effect of the dominant group size",
        which,
        restrict=lambda s: s["partition"] == "cumulative",
        what="sweep over the cumulative threshold",
    )


# ----------------------------------------------------------------------------- CLI


def _slug(s) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)).strip("-")


def make_all(
    df: pd.DataFrame,
    out: str,
    which: str = "best",
    stats_files=None,
    module: str | None = None,
    layers=None,
    only=None,
    shared_scale: bool = False,
) -> tuple[list[str], list[str]]:
    """Write every figure that has input; returns (written paths, skip messages). Each skipped
    figure prints its reason once, as it is made."""
    only = set(only or ["2", "3", "4", "5", "6", "7", "8"])
    written, skipped = [], []

    def keep(fig, name):
        paths = save(fig, out, name)
        (written.extend(paths) if paths else skipped.append(f"{name}: {fig.missing_input}"))
        plt.close(fig)

    if only & {"2", "7", "8"}:
        if stats_files:
            sources = [(os.path.basename(os.path.dirname(os.path.abspath(p))) or "stats", p) for p in stats_files]
        else:
            sources = heatmap_sources(df)
        if not sources:
            skipped.append("fig2/fig7/fig8: no importance.pt (no PiLoRA record and no --stats)")
            say(f"gradient heat maps: {skipped[-1]}")
        for tag, path in sources:
            loaded = load_stats(path)  # once, for both figures (a missing file: the figure says so)
            path = loaded if loaded is not None else path
            model = loaded.meta.get("model", tag) if loaded is not None else tag
            if "2" in only:
                keep(
                    gradient_heatmaps(path, layers or "last", shared_scale=shared_scale), f"fig2_gradients_{_slug(tag)}"
                )
            # the paper's Fig. 7 spreads LLaMA2-7B's layers, Fig. 8 LLaMA3-8B's: the number follows the model
            number = "8" if "llama3" in str(model).lower() else "7"
            if number in only and not layers:
                keep(
                    gradient_heatmaps(path, "spread", shared_scale=shared_scale),
                    f"fig{number}_gradients_layers_{_slug(tag)}",
                )
    if "3" in only:
        keep(partition_patterns(df, module), "fig3_partition_patterns")
    if "4" in only:
        keep(fig_rprime(df, which), "fig4_rprime")
    if "5" in only:
        keep(fig_rank(df, which), "fig5_rank")
    if "6" in only:
        keep(fig_group_size(df, which), "fig6_group_size")
    return written, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Figures 2-8 from run records (PNG + PDF).")
    add_source_args(p)
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--which", choices=["best", "final"], default="best")
    p.add_argument("--stats", nargs="+", help="importance.pt files for Fig. 2/7/8 (default: from the records)")
    p.add_argument("--module", help="Fig. 3: module name substring (default: the last layer's first target)")
    p.add_argument("--layers", nargs="+", type=int, help="Fig. 2: layer indices (default: the last layer)")
    p.add_argument("--shared-scale", action="store_true", help="Fig. 2/7: one colour scale for all panels")
    p.add_argument("--only", nargs="+", choices=["2", "3", "4", "5", "6", "7", "8"], help="just these figures")
    args = p.parse_args(argv)
    plt.switch_backend("Agg")  # files only; notebooks keep their inline backend
    try:
        df = load_source(args)
    except WandbSourceError as err:
        say(f"error: {err}")
        return 2
    written, skipped = make_all(
        df, args.out, args.which, args.stats, args.module, args.layers, args.only, args.shared_scale
    )
    for w in written:  # (each skipped figure has already said why)
        print(w)
    if not written:
        say("no figure written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
