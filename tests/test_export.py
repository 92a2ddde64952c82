"""The adapter folders a run writes load in stock PEFT and lm-eval and give the model's numbers."""

import copy
import json

import pytest
import torch
from conftest import tiny_llama_and_tokenizer

from pilora import MethodConfig, load_adapter, pilora_masks, prepare_model
from pilora.export import ADAPTER_DIR, PILORA_ADAPTER_DIR, ExportError, export_run, layout, write_adapters
from pilora.export import main as export_main
from pilora.peft_layers import lora_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
TEXTS = [("the cat sat on the", " mat"), ("alpha beta gamma", " delta omega"), ("good morning", " to you all")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The configured tiny LLaMA (conf/model/tiny-llama.yaml) saved with save_pretrained, with its
    tokenizer (no download)."""
    model, tok = tiny_llama_and_tokenizer()
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _trained_pilora(path, seed=0):
    """A stage-2 PiLoRA model with random (non-zero) adapter weights and random partitions."""
    base = _base(path)
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, mod in base.named_modules():
        if name.split(".")[-1] in TARGETS:
            masks[name] = torch.rand(mod.weight.shape[0], generator=g) < 0.4
    cfg = MethodConfig(
        name="pilora", r=4, alpha=8, dropout=0.0, supplementary_r=2, supplementary_alpha=4.0, target_modules=TARGETS
    )
    model = prepare_model(base, cfg, masks=masks, task_type="CAUSAL_LM")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _loglikelihoods(model, tok):
    """log p(continuation | context) the way lm-eval's hf model scores it (no special tokens)."""
    out = []
    with torch.no_grad():
        for ctx, cont in TEXTS:
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits.log_softmax(-1)[0]
            out.append(sum(logits[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    return out


def test_run_adapter_loads_in_stock_peft_and_lm_eval_with_identical_loglikelihoods(tiny_llama, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = _trained_pilora(tiny_llama)
    ours = _loglikelihoods(model, tok)
    assert max(abs(a - b) for a, b in zip(ours, _loglikelihoods(_base(tiny_llama), tok))) > 1e-2  # adapter matters
    run = tmp_path / "run"
    write_adapters(model, str(run))

    # the stock folder is a plain rank r + r' LoRA: PEFT loads it without PiLoRA code
    saved = json.load(open(run / ADAPTER_DIR / "adapter_config.json"))
    assert saved["peft_type"] == "LORA" and saved["r"] == 6 and saved["lora_alpha"] == 6
    stock = PeftModel.from_pretrained(_base(tiny_llama), str(run / ADAPTER_DIR)).eval()
    assert _loglikelihoods(stock, tok) == pytest.approx(ours, abs=1e-4)

    # the compact form still reloads exactly with pilora.load_adapter, partition included
    compact = load_adapter(_base(tiny_llama), str(run / PILORA_ADAPTER_DIR))
    assert _loglikelihoods(compact, tok) == pytest.approx(ours, abs=1e-5)
    assert all(torch.equal(pilora_masks(compact)[k], v) for k, v in pilora_masks(model).items())
    # adapter_pilora/ is the model's own save: its LoRA config is the export beside it (rank 6),
    # PiLoRA's config says PILORA with r = 4, r' = 2, and stock PEFT loads that folder too
    pilora_saved = json.load(open(run / PILORA_ADAPTER_DIR / "pilora_config.json"))
    assert (pilora_saved["peft_type"], pilora_saved["r"], pilora_saved["supplementary_r"]) == ("PILORA", 4, 2)
    assert json.load(open(run / PILORA_ADAPTER_DIR / "adapter_config.json"))["r"] == 6
    also = PeftModel.from_pretrained(_base(tiny_llama), str(run / PILORA_ADAPTER_DIR)).eval()
    assert _loglikelihoods(also, tok) == pytest.approx(ours, abs=1e-4)

    # lm-eval's hf model with peft=<run>/adapter, scoring requests as an lm-eval task does
    # add_bos_token=False: the BERT tokenizer would otherwise wrap each text in [CLS] ... [SEP]
    lm = HFLM(
        pretrained=tiny_llama,
        peft=str(run / ADAPTER_DIR),
        device="cpu",
        batch_size=1,
        dtype="float32",
        add_bos_token=False,
    )
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i) for i, (c, x) in enumerate(TEXTS)]
    scored = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    assert scored == pytest.approx(ours, abs=1e-4)


def _save_old_compact(model, path):
    """The compact layout runs wrote before: PEFT's own save (a rank-r LoRA config over compact
    tensors) and a pilora_config.json with only r'."""
    from peft import PeftModel

    PeftModel.save_pretrained(model, str(path))
    with open(path / "pilora_config.json", "w") as f:
        json.dump(model.pilora_config, f)


@pytest.mark.parametrize("old", ["compact_in_adapter", "compact_in_adapter_pilora"])
def test_export_of_an_old_run_writes_the_current_layout(tiny_llama, tmp_path, capsys, old):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = _trained_pilora(tiny_llama, seed=1)
    ours = _loglikelihoods(model, tok)
    run = tmp_path / "old"
    if old == "compact_in_adapter":  # the first layout: compact PiLoRA in adapter/
        _save_old_compact(model, run / ADAPTER_DIR)
        with pytest.raises(Exception):  # what stock tools did with it: a size mismatch
            PeftModel.from_pretrained(_base(tiny_llama), str(run / ADAPTER_DIR))
    else:  # the second: a stock adapter/ beside the compact form, whose config said LoRA of rank r
        from pilora import export_lora

        export_lora(model, str(run / ADAPTER_DIR))
        _save_old_compact(model, run / PILORA_ADAPTER_DIR)
    # the old compact folder loads as it is
    old_dir = run / (ADAPTER_DIR if old == "compact_in_adapter" else PILORA_ADAPTER_DIR)
    assert layout(str(old_dir)) == "compact"
    assert _loglikelihoods(load_adapter(_base(tiny_llama), str(old_dir)), tok) == pytest.approx(ours, abs=1e-5)

    assert export_main([str(tmp_path)]) == 0
    assert "PILORA" in capsys.readouterr().out
    assert layout(str(run / ADAPTER_DIR)) == "lora" and layout(str(run / PILORA_ADAPTER_DIR)) == "pilora"
    assert json.load(open(run / PILORA_ADAPTER_DIR / "adapter_config.json"))["r"] == 6
    for folder in (ADAPTER_DIR, PILORA_ADAPTER_DIR):
        stock = PeftModel.from_pretrained(_base(tiny_llama), str(run / folder)).eval()
        assert _loglikelihoods(stock, tok) == pytest.approx(ours, abs=1e-4)
    assert _loglikelihoods(load_adapter(_base(tiny_llama), str(run / PILORA_ADAPTER_DIR)), tok) == pytest.approx(
        ours, abs=1e-5
    )
    assert export_run(str(run)) is None  # converting twice changes nothing


def test_a_cut_short_conversion_is_finished_by_rerunning(tiny_llama, tmp_path):
    """Interrupted after pilora_config.json was rewritten but before the stock files were: the folder
    still loads, and the command finishes it."""
    from safetensors.torch import load_file

    from pilora.export import finish_pilora_folder

    model = _trained_pilora(tiny_llama, seed=2)
    run = tmp_path / "run"
    _save_old_compact(model, run / PILORA_ADAPTER_DIR)
    compact = load_file(str(run / PILORA_ADAPTER_DIR / "adapter_model.safetensors"))
    finish_pilora_folder(str(run / PILORA_ADAPTER_DIR))
    from safetensors.torch import save_file

    save_file(compact, str(run / PILORA_ADAPTER_DIR / "adapter_model.safetensors"))  # the old weights file back
    ref = load_adapter(_base(tiny_llama), str(run / PILORA_ADAPTER_DIR))
    assert "rank" in (export_run(str(run)) or "")
    again = load_adapter(_base(tiny_llama), str(run / PILORA_ADAPTER_DIR))
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(ref(input_ids=x).logits, again(input_ids=x).logits)
    assert not any(
        k.endswith("dominant_mask") for k in load_file(str(run / PILORA_ADAPTER_DIR / "adapter_model.safetensors"))
    )


def test_exported_config_lists_each_head_once_and_keeps_the_trained_head(tmp_path, tiny_mlp):
    from peft import PeftModel

    base = copy.deepcopy(tiny_mlp)
    masks = {"up": torch.arange(16) % 3 == 0, "down": torch.arange(12) % 2 == 0}
    cfg = MethodConfig(
        name="pilora",
        r=2,
        alpha=4,
        dropout=0.0,
        supplementary_r=1,
        target_modules=["up", "down"],
        modules_to_save=["head", "head"],
    )
    model = prepare_model(copy.deepcopy(base), cfg, masks=masks)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randn(5, 10)
    write_adapters(model, str(tmp_path))
    saved = json.load(open(tmp_path / ADAPTER_DIR / "adapter_config.json"))
    assert saved["modules_to_save"] == ["head"]
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / ADAPTER_DIR)).eval()
    assert torch.allclose(stock(x), model.eval()(x), atol=1e-5)  # the head's trained weights came along
    assert not torch.allclose(base(x), model(x), atol=1e-3)


def test_export_refuses_a_folder_that_is_not_pilora(tmp_path, tiny_mlp):
    from pilora.export import export_compact

    model = prepare_model(tiny_mlp, MethodConfig(name="lora", r=2, target_modules=["up"]))
    model.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ExportError, match="not a compact PiLoRA adapter"):
        export_compact(str(tmp_path / "lora"), str(tmp_path / "out"))
    assert export_main([str(tmp_path / "missing")]) == 1
    assert len(lora_layers(model)) == 1
