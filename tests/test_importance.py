import pytest
import torch
from conftest import TinyMLP
from torch import nn

from pilora import ImportanceAccumulator, ImportanceStats, approx_full_grad, prepare_model, row_scores
from pilora.importance import ModuleStats
from pilora.peft_layers import lora_layers

CFG = dict(name="pilora", r=4, alpha=8, dropout=0.0, target_modules=["up", "down"])


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _one_backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
    model.zero_grad()
    _loss(model, x, y).backward()
    return x, y


def test_approx_grad_is_first_order_weight_change_of_sgd_step(tiny_mlp):
    model = prepare_model(tiny_mlp, CFG, stage=1)
    layer = lora_layers(model)["down"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():  # move B off zero so both terms of Eq. 7 matter
        B.normal_(0, 0.3)
    _one_backward(model)
    s = layer.scaling["default"]
    A, B, gA, gB = (t.detach().double() for t in (A, B, A.grad, B.grad))
    G = approx_full_grad(A, B, gA, gB, s)
    for eta in (1e-3, 1e-4):
        delta = s * (B - eta * gB) @ (A - eta * gA) - s * B @ A  # the effective ΔW change of one SGD step
        residual = (delta + eta * G).abs().max() / (eta * G).abs().max()
        # δW = −η G̃ + O(η²): the relative residual shrinks linearly with η
        assert residual < 50 * eta
        assert torch.allclose(delta + eta * G, s * eta**2 * gB @ gA, atol=1e-15)


def test_with_B_zero_only_second_term_remains(tiny_mlp):
    model = prepare_model(tiny_mlp, CFG, stage=1)
    layer = lora_layers(model)["up"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.count_nonzero(B) == 0
    _one_backward(model)
    G = approx_full_grad(A, B, A.grad, B.grad, layer.scaling["default"])
    assert torch.allclose(G, layer.scaling["default"] * B.grad @ A, atol=1e-7)
    assert G.abs().sum() > 0


def test_row_scores_hand_built_case_and_chunking():
    A = torch.tensor([[1.0, -2.0, 0.0]])  # r=1, n=3
    B = torch.tensor([[1.0], [0.0], [2.0], [-1.0]])  # m=4
    gA = torch.tensor([[0.5, 0.5, 1.0]])
    gB = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    # G̃ = B gA + gB A = rows: [.5,.5,1], [1,-2,0], [1,1,2], [-.5-... ] computed by hand:
    expected_rows = torch.tensor([[0.5, 0.5, 1.0], [1.0, -2.0, 0.0], [1.0, 1.0, 2.0], [0.5, -2.5, -1.0]])
    assert torch.allclose(approx_full_grad(A, B, gA, gB), expected_rows)
    expected = torch.tensor([2.0, 3.0, 4.0, 4.0])
    for chunk in (1, 3, 4, 100):
        assert torch.allclose(row_scores(A, B, gA, gB, 1.0, chunk_rows=chunk), expected)
    assert torch.allclose(row_scores(A, B, gA, gB, 2.0), 2 * expected)
    stats = ModuleStats.empty(4, 3)
    stats.update(expected)  # mean 3.25: rows 2 and 3 are hits
    assert stats.hits.tolist() == [0, 0, 1, 1] and stats.checks == 1
    stats.update(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert stats.hits.tolist() == [1, 0, 1, 1] and stats.checks == 2
    assert torch.allclose(stats.score_sum, torch.tensor([7.0, 3.0, 4.0, 4.0], dtype=torch.float64))


def test_snapshot_is_pooled_mean_of_abs_grad():
    torch.manual_seed(0)
    A, B, gA, gB = torch.randn(2, 8), torch.randn(6, 2), torch.randn(2, 8), torch.randn(6, 2)
    snap = torch.zeros(3, 4)
    row_scores(A, B, gA, gB, 1.0, chunk_rows=4, snapshot=snap)
    dense = approx_full_grad(A, B, gA, gB).abs()
    expected = dense.reshape(3, 2, 4, 2).mean(dim=(1, 3))
    assert torch.allclose(snap, expected, atol=1e-6)
    crop = torch.zeros(3, 4)  # a crop: the first 3 rows and 4 columns as they are
    row_scores(A, B, gA, gB, 1.0, chunk_rows=2, snapshot=crop, window=(3, 4))
    assert torch.allclose(crop, dense[:3, :4], atol=1e-6)


@pytest.mark.parametrize(
    "window, contrast",
    [(None, (9.9, 10.1)), ("pool", (0.99, 1.01))],  # None: the default (crop 256 × 256)
)
def test_the_default_snapshot_keeps_single_neuron_bands_that_pooling_averages_away(window, contrast):
    """Fig. 2/7/8 show horizontal bands, one output neuron per row. Hot neurons every other row
    (|G̃| 10x): the default crop shows them as they are, a 64-row pool of 512 rows shows none."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 512)), LoraConfig(r=4, target_modules=["0"]))
    pool = {"snapshot_window": "pool", "snapshot_shape": (64, 16)}
    acc = ImportanceAccumulator(model, interval=1, **(pool if window else {}))
    weight = torch.tensor([1.0, 0.1]).repeat(256)
    (model(torch.randn(8, 16)) * weight).sum().backward()
    acc.update()
    (stats,) = acc.finalize().modules.values()
    assert stats.hits.view(-1, 2)[:, 0].all() and not stats.hits.view(-1, 2)[:, 1].any()  # H sees the bands
    rows = stats.grad_snapshot.sum(dim=1)
    assert contrast[0] < (rows.max() / rows.min()).item() < contrast[1]
    assert stats.window == ((512, 16) if window else (256, 16))


def test_accumulator_every_K_steps_matches_hand_computation(tiny_mlp):
    model = prepare_model(tiny_mlp, CFG, stage=1)
    acc = ImportanceAccumulator(model, interval=3, chunk_rows=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    acc.attach(opt)
    layers = lora_layers(model)
    manual = {k: ModuleStats.empty(*l.get_base_layer().weight.shape) for k, l in layers.items()}
    for step in range(7):
        _one_backward(model, seed=step)
        if step % 3 == 0:  # the hook must do exactly this, before the update
            for k, l in layers.items():
                A, B = l.lora_A["default"].weight, l.lora_B["default"].weight
                S = approx_full_grad(A, B, A.grad, B.grad, l.scaling["default"]).abs().sum(1)
                manual[k].update(S)
        opt.step()
    stats = acc.finalize()
    for k in layers:
        assert stats.modules[k].checks == 3  # steps 0, 3, 6
        assert torch.equal(stats.modules[k].hits, manual[k].hits)
        assert torch.allclose(stats.modules[k].score_sum, manual[k].score_sum, rtol=1e-5)


def test_stats_save_load_roundtrip_and_mismatch_errors(tiny_mlp, tmp_path):
    model = prepare_model(tiny_mlp, CFG, stage=1)
    acc = ImportanceAccumulator(model, interval=1)
    _one_backward(model)
    acc.step()
    path = tmp_path / "importance.pt"
    acc.finalize().save(path)
    loaded = ImportanceStats.load(path)
    for k, s in acc.stats.modules.items():
        assert torch.equal(loaded.modules[k].hits, s.hits) and loaded.modules[k].shape == s.shape
        assert torch.equal(loaded.modules[k].score_sum, s.score_sum)
    with pytest.raises(ValueError, match="shape mismatches"):
        loaded.check_matches({"up": (16, 10), "down": (99, 16)})
    with pytest.raises(ValueError, match="modules without statistics"):
        loaded.check_matches({"up": (16, 10), "down": (12, 16), "other": (3, 3)})
    with pytest.raises(FileNotFoundError, match="importance_from"):
        ImportanceStats.load(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="re-run stage 1"):
        ImportanceStats.load(tmp_path / "bad.pt")


def test_accumulator_needs_lora(tiny_mlp):
    with pytest.raises(ValueError, match="no LoRA layers"):
        ImportanceAccumulator(tiny_mlp)


# ----------------------------------------------------------------- the check on the device


class SameShapes(nn.Module):
    """Three 8→12 target layers (one group), one 12→30 (another), a frozen head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 12)
        self.d = nn.Linear(12, 30)
        self.head = nn.Linear(30, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + torch.tanh(self.b(x)) * torch.tanh(self.c(x))
        return self.head(torch.tanh(self.d(h)))


SAME = dict(name="pilora", r=3, alpha=6, dropout=0.0, target_modules=["a", "b", "c", "d"])


def _same_model(seed=0):
    torch.manual_seed(seed)
    model = prepare_model(SameShapes(), SAME, stage=1)
    with torch.no_grad():  # B off zero: both terms of Eq. 7
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.2)
    return model


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.zero_grad()
    _loss(model, x, y).backward()


class _Calls(torch.overrides.TorchFunctionMode):
    """Records every torch function / Tensor method called while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# calls that copy a value to the host or wait for the device (data-dependent shapes)
HOST_SYNCS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "bincount",
    "unique",
    "masked_select",
    "any",
    "all",
    "equal",
    "allclose",
}


@pytest.mark.parametrize("window", ["crop", "pool"])
@pytest.mark.parametrize("chunk_rows", [1024, 5])  # whole modules per block / row chunks of one module
def test_batched_device_check_equals_per_module_reference(chunk_rows, window):
    model = _same_model()
    layers = lora_layers(model)
    acc = ImportanceAccumulator(model, interval=1, chunk_rows=chunk_rows, snapshot_shape=(4, 5), snapshot_window=window)
    manual = {
        k: ModuleStats.empty(*l.get_base_layer().weight.shape, snapshot_shape=(4, 5), window=window)
        for k, l in layers.items()
    }
    for step in range(4):
        _backward(model, step)
        with _Calls() as calls:
            acc.update()
        assert not HOST_SYNCS & set(calls.names), sorted(HOST_SYNCS & set(calls.names))
        # one GEMM per block of at most the largest single-module chunk (d: min(chunk_rows, 30) × 12):
        # chunk 1024 → a, b, c in one block + d in one; chunk 5 → 60 elements: 2 row blocks per module
        assert calls.names.count("bmm") == {1024: 2, 5: 12}[chunk_rows]
        with torch.no_grad():
            for k, l in layers.items():
                A, B = l.lora_A["default"].weight, l.lora_B["default"].weight
                S = row_scores(
                    A,
                    B,
                    A.grad,
                    B.grad,
                    l.scaling["default"],
                    snapshot=manual[k].grad_snapshot,
                    window=manual[k].window,
                )
                manual[k].update(S)
    stats = acc.finalize()
    for k in layers:
        s = stats.modules[k]
        assert s.checks == 4 and s.snapshots is None and s.hits.device.type == "cpu"
        assert torch.equal(s.hits, manual[k].hits), k
        torch.testing.assert_close(s.score_sum, manual[k].score_sum, rtol=1e-6, atol=0)
        torch.testing.assert_close(s.grad_snapshot, manual[k].grad_snapshot, rtol=1e-5, atol=1e-7)


def test_check_on_the_meta_device_reads_no_value():
    """Every tensor of a meta model is data-less: any host read (.item(), .cpu(), .tolist(), a
    data-dependent shape) raises. Checks with and without the snapshot run through."""
    with torch.device("meta"):
        model = prepare_model(SameShapes(), SAME, stage=1)
    acc = ImportanceAccumulator(model, interval=1, snapshot_interval=2)
    for layer in lora_layers(model).values():
        for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            w.grad = torch.empty_like(w)
    for _ in range(3):
        acc.update()
    assert acc.checks_done == 3
    assert all(t.device.type == "meta" for t in acc.state_tensors())
    assert {len(g.names) for g in acc._groups} == {3, 1}  # a, b, c scored together


def test_snapshot_interval_pools_every_kth_check_and_keeps_the_per_check_scale(tmp_path):
    ref, rare = _same_model(), _same_model()
    acc_ref = ImportanceAccumulator(ref, interval=1, snapshot_shape=(4, 5))
    acc = ImportanceAccumulator(rare, interval=1, snapshot_shape=(4, 5), snapshot_interval=2)
    pooled = {k: [] for k in lora_layers(ref)}
    for step in range(4):
        for model, a in ((ref, acc_ref), (rare, acc)):
            _backward(model, step)
            a.update()
        for k, l in lora_layers(ref).items():  # this check's pooled |G̃|
            A, B = l.lora_A["default"].weight, l.lora_B["default"].weight
            snap = torch.zeros(4, 5)
            window = ModuleStats.empty(*B.shape[:1], A.shape[1], snapshot_shape=(4, 5)).window  # the default crop
            with torch.no_grad():
                row_scores(A, B, A.grad, B.grad, l.scaling["default"], snapshot=snap, window=window)
            pooled[k].append(snap)
    s_ref, s = acc_ref.finalize(), acc.finalize()
    for k in pooled:
        a, b = s_ref.modules[k], s.modules[k]
        assert torch.equal(a.hits, b.hits) and torch.equal(a.score_sum, b.score_sum)  # H, ΣS untouched
        assert b.checks == 4 and b.snapshots == 2  # checks 0 and 2 were pooled
        torch.testing.assert_close(b.grad_snapshot / b.checks, (pooled[k][0] + pooled[k][2]) / 2)
    s.save(tmp_path / "importance.pt")
    loaded = ImportanceStats.load(tmp_path / "importance.pt")
    assert all(loaded.modules[k].snapshots == 2 for k in pooled)
    with pytest.raises(ValueError, match="snapshot_interval must be ≥ 1"):
        ImportanceAccumulator(rare, snapshot_interval=0)


def test_resumed_accumulator_continues_the_same_statistics(tmp_path):
    def run(stop=None):
        model = _same_model()
        acc = ImportanceAccumulator(model, interval=1, snapshot_shape=(4, 5), snapshot_interval=3)
        for step in range(7):
            if step == stop:
                acc.stats.save(tmp_path / "ckpt.pt")
                acc = ImportanceAccumulator(
                    model,
                    interval=1,
                    snapshot_shape=(4, 5),
                    snapshot_interval=3,
                    stats=ImportanceStats.load(tmp_path / "ckpt.pt"),
                )
            _backward(model, step)
            acc.update()
        return acc.finalize()

    whole, resumed = run(), run(stop=4)
    for k, a in whole.modules.items():
        b = resumed.modules[k]
        assert torch.equal(a.hits, b.hits) and a.checks == b.checks == 7 and a.snapshots == b.snapshots == 3
        torch.testing.assert_close(a.score_sum, b.score_sum, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.grad_snapshot, b.grad_snapshot, rtol=1e-6, atol=0)


def test_layers_without_gradients_are_skipped_for_that_check():
    model = _same_model()
    acc = ImportanceAccumulator(model, interval=1)
    _backward(model, 0)
    acc.update()
    lora_layers(model)["b"].lora_A["default"].weight.grad = None  # b not reached this time
    acc.update()
    stats = acc.finalize()
    assert stats.modules["b"].checks == 1 and stats.modules["a"].checks == stats.modules["c"].checks == 2
    assert int(stats.modules["b"].hits.max()) <= 1
    # the statistics stay readable and the accumulator keeps accumulating after finalize
    _backward(model, 1)
    acc.update()
    assert acc.finalize().modules["b"].checks == 2


def test_check_has_no_graph_break():
    from pilora.importance import score_group

    g, m, n, r = 3, 20, 12, 4
    args = (
        torch.randn(g, m, 2 * r),
        torch.randn(g, 2 * r, n),
        torch.empty(2 * m * n),
        torch.zeros(g, m, dtype=torch.int64),
        torch.zeros(g, m, dtype=torch.float64),
        torch.zeros(g, 5, 4),
        torch.arange(m) * 5 // m,
        torch.full((m,), 0.25),
    )
    explained = torch._dynamo.explain(score_group)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons


def _scaled_stage1(skip_nonfinite, steps=6, interval=2):
    """A hand-written stage 1 under a real GradScaler whose first scale overflows the gradients
    (2^127 on inputs of size ~100): the scaler skips step 0's update, then backs off to 2^27."""
    torch.manual_seed(0)
    model = prepare_model(
        nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), {**CFG, "target_modules": ["0", "2"]}, stage=1
    )  # a model whose step-0 gradients overflow at this scale (`finite` below checks it)
    with torch.no_grad():  # B off zero, so both terms of Eq. 7 (and their overflow) count
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    acc = ImportanceAccumulator(model, interval=interval)
    g = torch.Generator().manual_seed(1)
    finite = []
    for _ in range(steps):
        x, y = 100 * torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        scaler.unscale_(opt)  # as Trainer does (clip_grad_norm_) before its pre-optimizer-step point
        finite.append(acc.gradients_finite())
        acc.step(skip_nonfinite=skip_nonfinite)
        scaler.step(opt)
        scaler.update()
    return acc.finalize(), acc.skipped_checks, finite


def test_check_of_an_update_the_loss_scaler_skips_is_skipped():
    """fp16 with a loss scaler: a step whose gradients overflow is not an update (the scaler skips
    it), so its check is not taken either. Taking it would add NaN to ΣS (0 · inf in B·Gᴬ at
    B = 0, inf elsewhere) and count a check with no hits."""
    from pilora.runner.stats_check import impossible_counts

    stats, skipped, finite = _scaled_stage1(skip_nonfinite=True)
    assert finite == [False] + [True] * 5  # the case is what it claims: only step 0 overflowed
    assert skipped == [0] and stats.meta["skipped_checks"] == [0]
    assert all(s.checks == 2 for s in stats.modules.values())  # checks at steps 2 and 4, not 0
    assert impossible_counts(stats) == [] and all(int(s.hits.sum()) > 0 for s in stats.modules.values())
    taken, skipped, _ = _scaled_stage1(skip_nonfinite=False)  # without it: the statistics are unusable
    assert skipped == [] and all(s.checks == 3 for s in taken.modules.values())
    assert impossible_counts(taken) and all("NaN/inf score sum" in p for p in impossible_counts(taken))


def test_callback_skips_only_under_a_loss_scaler(tmp_path, caplog):
    """ImportanceCallback reads the scaler off accelerate's optimizer (Trainer passes it): with a
    GradScaler an overflowed check is skipped and logged; without one (bf16, fp32, CPU) every check
    runs, since the optimizer applies that update too."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from pilora.callbacks import ImportanceCallback

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads (after the args, which reset it)
    for scaler, want_checks in ((torch.amp.GradScaler("cpu"), 0), (None, 1)):
        model = prepare_model(TinyMLP(), CFG, stage=1)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AcceleratedOptimizer(torch.optim.AdamW(params), device_placement=False, scaler=scaler)
        for p in params:
            p.grad = torch.full_like(p, float("inf"))
        cb = ImportanceCallback(ImportanceAccumulator(model, interval=1))
        with caplog.at_level("WARNING", logger="pilora"):
            cb.on_pre_optimizer_step(args, TrainerState(global_step=0), TrainerControl(), model=model, optimizer=opt)
        stats = cb.accumulator.finalize()
        assert all(s.checks == want_checks for s in stats.modules.values())
        assert cb.accumulator.skipped_checks == ([0] if scaler else [])
        assert ("importance check of step 0 is skipped" in caplog.text) == (scaler is not None)
        caplog.clear()


def test_a_check_is_skipped_with_the_update_when_only_a_trained_heads_gradient_overflows(tmp_path):
    """The loss scaler skips an update when any gradient it holds overflowed, a head trained in full
    (GLUE's classifier, CLIP's linear head) included: the importance check of that step goes too,
    though every LoRA gradient is finite."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from pilora.callbacks import ImportanceCallback

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    Accelerator(cpu=True)
    model = prepare_model(TinyMLP(), CFG, stage=1)
    head = model.base_model.model.head
    head.requires_grad_(True)  # trained in full (modules_to_save)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cpu")
    opt = AcceleratedOptimizer(torch.optim.AdamW(params), device_placement=False, scaler=scaler)
    scaler.scale(model(torch.randn(8, 10)).sum()).backward()
    head.weight.grad[0, 0] = float("inf")  # the head's gradient alone overflowed
    scaler.unscale_(opt.optimizer)
    cb = ImportanceCallback(ImportanceAccumulator(model, interval=1))
    cb.on_pre_optimizer_step(args, TrainerState(global_step=0), TrainerControl(), model=model, optimizer=opt)
    opt.step()
    assert opt.step_was_skipped  # the scaler's decision
    assert cb.accumulator.skipped_checks == [0]
    assert all(s.checks == 0 for s in cb.accumulator.finalize().modules.values())


def test_a_foreign_file_is_one_line_naming_what_it_holds(tmp_path):
    """method.importance_from at a file that is not a stage-1 importance.pt: one line, not torch's
    page of weights_only advice (which is about trusting other code's pickles)."""
    import argparse

    from pilora.importance import ImportanceStats

    torch.save(argparse.Namespace(a=1), tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    for name, cause in (
        ("pickled.pt", "(it holds Python objects, not the tensors and plain values a stage 1 writes)"),
        ("text.pt", "(not a file torch.save wrote)"),
    ):
        with pytest.raises(ValueError) as err:
            ImportanceStats.load(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and "\x1b" not in message and cause in message, message
        assert message.endswith("or point method.importance_from at another file")
