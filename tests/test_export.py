"""The adapter folders a run writes load in stock PEFT and lm-eval and give the model's numbers."""

import copy
import json

import pytest
import torch
from conftest import tiny_llama_and_tokenizer

from pilora import MethodConfig, load_adapter, pilora_masks, prepare_model, save_adapter
from pilora.export import ADAPTER_DIR, PILORA_ADAPTER_DIR, ExportError, export_run, write_adapters
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


def test_export_of_an_old_run_moves_the_compact_form_and_writes_a_stock_adapter(tiny_llama, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = _trained_pilora(tiny_llama, seed=1)
    ours = _loglikelihoods(model, tok)
    run = tmp_path / "old"
    save_adapter(model, str(run / ADAPTER_DIR))  # the old layout: compact PiLoRA in adapter/
    with pytest.raises(Exception):  # what stock tools did with it: a size mismatch
        PeftModel.from_pretrained(_base(tiny_llama), str(run / ADAPTER_DIR))

    assert export_main([str(tmp_path)]) == 0
    assert "exported rank 6 LoRA" in capsys.readouterr().out
    stock = PeftModel.from_pretrained(_base(tiny_llama), str(run / ADAPTER_DIR)).eval()
    assert _loglikelihoods(stock, tok) == pytest.approx(ours, abs=1e-4)
    assert _loglikelihoods(load_adapter(_base(tiny_llama), str(run / PILORA_ADAPTER_DIR)), tok) == pytest.approx(
        ours, abs=1e-5
    )
    assert export_run(str(run)) is None  # converting twice changes nothing


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
