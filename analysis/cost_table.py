"""The cost table: wall time including stage 1, GPU-hours and peak memory of every table row."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .table_model import DASH, Table
from .table_text import _tex


@dataclass
class CostRow:
    """What the runs behind one table row cost (see the module docstring for the formulas)."""

    table: str
    model: str
    method: str
    jobs: int
    tasks: int
    seeds: list
    devices: list  # "NVIDIA H100 80GB HBM3", "2× …", "cpu"
    wall_h: float | None  # Σ total_s / 3600 over the timed jobs (None: none has a time)
    stage1_h: float | None  # Σ stage1_s / 3600 (None: no job has a stage 1)
    stage1_reused: int  # jobs that reused another job's stage 1 (method.importance_from)
    gpu_h: float | None  # Σ total_s × GPUs / 3600 over the timed GPU jobs (None: no GPU job)
    cpu_h: float | None  # Σ total_s / 3600 over the timed CPU jobs (None: no CPU job)
    peak_gb: float | None  # max peak_memory_mb / 1024
    untimed: int = 0  # jobs without timing.total_s
    gpus_assumed: int = 0  # GPU jobs whose record has neither n_gpus nor world_size (counted as 1)
    unknown_device: int = 0  # jobs whose record names no device (in no GPU-h / CPU-h sum)


def _col(recs: pd.DataFrame, name: str) -> pd.Series:
    if name in recs.columns:
        return pd.to_numeric(recs[name], errors="coerce")
    return pd.Series(float("nan"), index=recs.index, dtype=float)


def build_cost(table: Table) -> list[CostRow]:
    """One :class:`CostRow` per row of ``table`` that has records."""
    out = []
    for r in table.rows:
        recs = r.records
        if recs is None or recs.empty:
            continue
        total, stage1 = _col(recs, "time_total_s"), _col(recs, "time_stage1_s")
        dev = recs["device"] if "device" in recs.columns else pd.Series(None, index=recs.index, dtype=object)
        known = dev.notna()
        cpu = known & (dev.astype(str).str.lower() == "cpu")
        gpu = known & ~cpu
        n_gpus = _col(recs, "n_gpus")
        gpus = n_gpus.fillna(1.0)
        timed = total.notna()
        devices = sorted({(f"{int(g)}× {d}" if g > 1 else str(d)) for d, g, k in zip(dev, gpus, gpu | cpu) if k})
        out.append(
            CostRow(
                table=table.id,
                model=r.model,
                method=r.method,
                jobs=len(recs),
                tasks=recs["task"].nunique(),
                seeds=sorted(set(int(v) for v in recs["seed"])),
                devices=devices,
                wall_h=float(total[timed].sum()) / 3600 if timed.any() else None,
                stage1_h=float(stage1.dropna().sum()) / 3600 if stage1.notna().any() else None,
                stage1_reused=int((stage1.notna() & recs["importance_from"].notna()).sum()),
                gpu_h=float((total * gpus)[gpu & timed].sum()) / 3600 if gpu.any() else None,
                cpu_h=float(total[cpu & timed].sum()) / 3600 if cpu.any() else None,
                peak_gb=float(_col(recs, "peak_memory_mb").max()) / 1024
                if _col(recs, "peak_memory_mb").notna().any()
                else None,
                untimed=int((~timed).sum()),
                gpus_assumed=int((gpu & n_gpus.isna()).sum()),
                unknown_device=int((~known).sum()),
            )
        )
    return out


def hours_text(v: float | None) -> str:
    """Hours as printed in the cost table: 2 decimals, 2 significant digits below 0.01 h."""
    if v is None:
        return DASH
    if v == 0 or v >= 0.01:
        return f"{v:.2f}"
    return f"{v:.2g}"


COST_HEADER = [
    "Table",
    "Model",
    "Method",
    "Jobs",
    "Device",
    "Wall time (h)",
    "Stage 1 (h)",
    "GPU-h",
    "Peak memory (GB)",
]


def cost_texts(c: CostRow) -> list[str]:
    tasks = f"{c.tasks} task{'s' if c.tasks != 1 else ''}"
    seeds = ",".join(str(s) for s in c.seeds)
    jobs = (
        f"{c.jobs} ({tasks} × {len(c.seeds)} seeds)"
        if c.jobs == c.tasks * len(c.seeds) and len(c.seeds) > 1
        else f"{c.jobs} ({tasks}, seed{'s' if len(c.seeds) != 1 else ''} {seeds})"
    )
    stage1 = hours_text(c.stage1_h) + (f" ({c.stage1_reused} reused)" if c.stage1_reused else "")
    compute = [hours_text(c.gpu_h)] if c.gpu_h is not None else []
    if c.cpu_h is not None:
        compute.append(f"{hours_text(c.cpu_h)} CPU-h")
    return [
        f"Table {c.table}",
        c.model,
        c.method,
        jobs,
        ", ".join(c.devices) or DASH,
        hours_text(c.wall_h),
        stage1,
        " + ".join(compute) or DASH,
        DASH if c.peak_gb is None else f"{c.peak_gb:.2f}",
    ]


def cost_notes(rows: list[CostRow]) -> list[str]:
    lines = [
        "Wall time: Σ over the row's jobs of timing.total_s (every stage: PiLoRA's stage 1, training, "
        "final evaluation); Stage 1: the part spent in stage 1 ('reused': jobs that loaded another job's "
        "stage 1 through method.importance_from and did not pay for it).",
        "GPU-h: Σ total_s × GPUs / 3600 over GPU jobs; jobs on the CPU are shown as CPU-h (wall-clock hours, "
        "not core-hours); GPUs per job: the record's n_gpus, else its world_size. Peak memory: largest "
        "peak_memory_mb of the row's jobs (GPU: allocated by torch, one process; CPU: the process's peak "
        "resident memory).",
    ]
    assumed = sum(c.gpus_assumed for c in rows)
    if assumed:
        lines.append(
            f"{assumed} GPU job(s) do not record their GPU count (n_gpus or world_size): counted as 1 GPU each."
        )
    untimed = sum(c.untimed for c in rows)
    if untimed:
        lines.append(f"{untimed} job(s) have no timing.total_s: left out of the hours.")
    unknown = sum(c.unknown_device for c in rows)
    if unknown:
        lines.append(f"{unknown} job(s) name no device: in the wall time, in neither GPU-h nor CPU-h.")
    return lines


def cost_markdown(tables: list[Table]) -> str:
    rows = [c for t in tables for c in build_cost(t)]
    lines = ["### Cost of the runs behind the tables", ""]
    if not rows:
        return "\n".join(lines + ["No records: no cost to show.", ""])
    lines += ["| " + " | ".join(COST_HEADER) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * 4) + "|"]
    lines += ["| " + " | ".join(cost_texts(c)) + " |" for c in rows]
    lines.append("")
    lines += [f"{n}  " for n in cost_notes(rows)]
    return "\n".join(lines) + "\n"


def cost_latex(tables: list[Table]) -> str:
    rows = [c for t in tables for c in build_cost(t)]
    if not rows:
        return "% Cost: no records.\n"
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\scriptsize",
        r"\caption{Cost of the runs behind the tables}",
        r"\begin{tabular}{lllll" + "r" * 4 + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in COST_HEADER) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(t) for t in cost_texts(c)) + r" \\" for c in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += ["% " + n for n in cost_notes(rows)]
    return "\n".join(lines) + "\n"
