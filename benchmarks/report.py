"""The benchmark record: environment, assembly (layer set, targets), the printed tables, the JSON file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from benchmarks.stats import layer_set_summary
from benchmarks.targets import evaluate_targets
from benchmarks.workloads import BASELINE, K_DEFAULT


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str, args: argparse.Namespace | None = None, script: str = "benchmarks.step_time") -> dict:
    """Versions, device, threads, load and the command line (``python -m script ...``) of a run."""
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg": loadavg(),
        "command": " ".join([os.path.basename(sys.executable), "-m", script, *sys.argv[1:]]),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = _cpu_name()
    if args is not None:
        env["args"] = vars(args)
    return env


def mib(b) -> str:
    return f"{b / 2**20:,.1f}"


def format_report(record: dict) -> str:
    """The printed table: medians, ratios to LoRA, memory, stage-1 overhead, targets."""
    lines = []
    env = record["environment"]
    lines.append(
        f"# PiLoRA benchmark — {env['date']} — torch {env['torch']} on {env['device']} "
        f"({env.get('device_name', '')}), {env['threads']} threads"
    )
    hdr = (
        f"{'workload':<14} {'method':<17} {'step ms':>9} {'×LoRA':>7} {'paired q25–q75':>15} {'robust×':>8} "
        f"{'peak MiB':>10} {'×LoRA':>7} {'step MiB':>9} {'trainable':>10}"
    )
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for name, w in record["workloads"].items():
        for m, t in w["time"].items():
            mem = w["memory"].get(m)
            pr = t["paired_ratio"]
            band = f"{pr['q25']:.3f}–{pr['q75']:.3f}" if pr else ""
            memcols = (
                f"{mib(mem['peak_bytes']):>10} {mem['ratio']:>7.3f} {mib(mem['step_peak_bytes']):>9}"
                if mem
                else f"{'':>10} {'':>7} {'':>9}"
            )
            params = w["adapter_params"].get(m, "")
            label = m if m != "importance_check" else "importance_check¹"
            rob = f"{t['robust_ratio']:.3f}" if "robust_ratio" in t else ""
            lines.append(
                f"{name:<14} {label:<17} {1e3 * t['median_s']:>9.2f} {t['ratio']:>7.3f} {band:>15} {rob:>8} "
                f"{memcols} {params:>10}"
            )
        ops = w.get("ops")
        if ops:
            cells = [
                f"{m} {o['ops']:.0f} ({o['ratio']:.3f}×, {o['autograd_nodes']:.0f} nodes"
                f"{', %d Python' % o['python_functions'] if o['python_functions'] else ''})"
                for m, o in ops.items()
            ]
            lines.append(f"{'':<14} aten ops per step: " + ", ".join(cells))
            lines.append(
                f"{'':<14} host ms per step: "
                + ", ".join(f"{m} {1e3 * o['host_s']:.2f} ({o['host_ratio']:.3f}×)" for m, o in ops.items())
            )
        s1 = w["stage1"]
        parts = [
            f"{k}={100 * v:+.2f}%"
            for k, v in s1.items()
            if isinstance(v, float) and k != "check_s" and k != "default_k"
        ]
        if parts:
            lines.append(f"{'':<14} stage-1 overhead vs LoRA: " + ", ".join(parts))
        mi = w.get("merged_inference")
        if mi:
            lines.append(
                f"{'':<14} merged PiLoRA inference: {1e3 * mi['merged_s']:.2f} ms vs base "
                f"{1e3 * mi['base_s']:.2f} ms ({mi['ratio']:.3f}×), "
                f"|merged − unmerged| ≤ {mi['max_abs_diff_vs_unmerged']:.1e}"
            )
        lines.append("")
    ls = record.get("layer_set")
    if ls:
        lines.append(f"layer set ({' + '.join(ls['layers'])}): summed medians")
        for m, t in ls["time"].items():
            mem = ls.get("memory", {}).get(m)
            memtxt = f"   peak {mib(mem['peak_bytes'])} MiB ({mem['ratio']:.3f}×)" if mem else ""
            lines.append(f"  {m:<17} {1e3 * t['median_s']:>9.2f} ms  {t['ratio']:.3f}×{memtxt}")
        if "stage1" in ls:
            lines.append(
                f"  stage-1 overhead (amortised from one check): K=1 {100 * ls['stage1']['k1_amortised']:+.2f}%,"
                f" K={K_DEFAULT} {100 * ls['stage1'][f'k{K_DEFAULT}_amortised']:+.2f}%"
            )
        lines.append("")
    imp = record.get("importance_memory")
    if imp:
        lines.append(f"importance pass (one update() over {', '.join(imp['layers'])}; chunk_rows={imp['chunk_rows']}):")
        lines.append(
            f"  peak extra {mib(imp['peak_extra_bytes'])} MiB = {imp['peak_extra_bytes'] / imp['chunk_bytes']:.2f}× "
            f"the largest chunk ({mib(imp['chunk_bytes'])} MiB), {imp['peak_extra_bytes'] / imp['dense_bytes']:.3f}× "
            f"a dense m×n ({mib(imp['dense_bytes'])} MiB); largest block {imp['max_block_elems']:,} elements "
            f"(bound {imp['chunk_bound_elems']:,}); at most {imp['max_live_blocks']} block(s) alive at once"
        )
        lines.append("")
    lines.append(
        "step ms / ×LoRA: median over repeats of the per-step mean of a window, and its ratio to LoRA's; "
        "paired: quartiles of the same-round ratios;"
    )
    lines.append(
        "robust×: ratio of spike-robust per-step times (median of individually timed steps, check steps "
        "weighted by their share); peak = static + step peak (see the module docstring)"
    )
    lines.append("¹ one ImportanceAccumulator.update() alone (no step); ratios are to a LoRA step")
    lines.append("targets:")
    for row in record["targets"]:
        lines.append(
            f"  [{'PASS' if row['pass'] else 'MISS'}] {row['description']:<55} {row['where']:<12} {row['shown']}"
        )
    return "\n".join(lines)


def format_breakdown(per_op: dict, methods=(BASELINE, "pilora"), rows: int = 25) -> str:
    a, b = methods
    total = {m: sum(v.get(m, 0.0) for v in per_op.values()) for m in methods}
    lines = [f"{'operator (self time, ms/step)':<58} {a:>10} {b:>10} {b + ' − ' + a:>14}"]
    ranked = sorted(per_op.items(), key=lambda kv: -abs(kv[1].get(b, 0.0) - kv[1].get(a, 0.0)))
    for op, t in ranked[:rows]:
        lines.append(
            f"{op[:58]:<58} {t.get(a, 0.0):>10.2f} {t.get(b, 0.0):>10.2f} {t.get(b, 0.0) - t.get(a, 0.0):>+14.2f}"
        )
    lines.append(f"{'total':<58} {total[a]:>10.2f} {total[b]:>10.2f} {total[b] - total[a]:>+14.2f}")
    return "\n".join(lines)


def build_record(workloads: dict, importance: dict | None, env: dict, config: dict) -> dict:
    """The JSON record: environment, config, per-workload results, the layer set and the targets."""
    record = {
        "environment": env,
        "config": config,
        "workloads": workloads,
        "layer_set": layer_set_summary(workloads),
        "importance_memory": importance,
    }
    record["targets"] = evaluate_targets(record)
    return record


def publish(res: dict, args, script: str, table: str) -> dict:
    """A side script's ending: the environment into ``res``, ``table`` printed, ``args.out`` written."""
    res["environment"] = environment(args.device, args, script=script)
    print(table)
    if args.out:
        write_json(args.out, res)
    return res


def write_json(path: str, record: dict) -> None:
    """Write ``record`` to ``path`` (its folder is created), one space of indent, non-JSON values as text."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
