import pytest

from pilora.paper_params import meta_count

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize(
    "setting,count,share",
    [
        ("LLaMA2-7B", 56_098_816, 0.83),
        ("LLaMA3-8B", 56_623_104, 0.70),
        ("CLIP ViT-B/32 image encoder", 1_327_104, 1.49),
    ],
)
def test_design_table_lora_counts_on_meta_device(setting, count, share):
    c = meta_count(setting)
    assert c.adapter == count
    assert round(100 * c.adapter_share, 2) == share


def test_roberta_large_both_conventions():
    c = meta_count("RoBERTa-large", r=32)
    assert c.adapter == 14_155_776
    assert round(100 * c.adapter_share_of_backbone, 2) == 4.00  # GOAT: of the 354.3 M backbone
    assert round(100 * c.adapter_share, 2) == 3.83  # PEFT-style, head included
    assert round(c.backbone / 1e6, 1) == 354.3
    # the classifier head trains in full, as in the runs (modules_to_save), and counts once: PEFT's
    # frozen copy of it (original_module) is no parameter of the model that runs (3.82 % with it)
    head = 1024 * 1024 + 1024 + 1024 * 2 + 2
    assert c.trainable == c.adapter + head
    assert c.total == c.backbone + head + c.adapter


def test_pilora_top_half_share():
    c = meta_count("LLaMA2-7B", "pilora", dominant_fraction=0.5)
    # (r+r')·n + |M|·r + (m−|M|)·r' summed over the 160 target layers
    per_layer = 3 * (34 * 4096 + 2048 * 34) + (34 * 4096 + 5504 * 34) + (34 * 11008 + 2048 * 34)
    assert c.adapter == 32 * per_layer
    assert round(100 * c.adapter_share, 2) == 0.66


def test_glue_parameter_column_counts_what_tab6_trains():
    """Tab. 6 trains r = 8: LoRA is 1.00 % of the backbone, not the printed 4.00 %, and PiLoRA at
    r = 8, r' = 1 stays far below its printed 3.26 % even with every row dominant."""
    from pilora.paper_params import GLUE_PARAMS_NOTE, PAPER_ROWS

    lora = meta_count("RoBERTa-large")  # the setting's default rank is Tab. 6's
    # per block: q, k, v, attention.output.dense (1024 → 1024), intermediate (1024 → 4096), output (4096 → 1024)
    assert lora.adapter == 24 * 8 * (4 * 2048 + 2 * 5120)
    assert round(100 * lora.adapter_share_of_backbone, 2) == 1.00
    full = meta_count("RoBERTa-large", "pilora", r=8, supplementary_r=1, dominant_fraction=1.0)
    assert full.adapter == 24 * (4 * (9 * 1024 + 1024 * 8) + (9 * 1024 + 4096 * 8) + (9 * 4096 + 1024 * 8))
    assert 100 * full.adapter_share_of_backbone < 1.1 < 3.26
    # the CLI's rows put the trained r = 8 beside the paper's printed 4.00 % (and 3.26 % for PiLoRA)
    assert ("RoBERTa-large", "lora", 8, None, None, 4.00) in PAPER_ROWS
    assert ("RoBERTa-large", "pilora", 8, 1, 1.0, 3.26) in PAPER_ROWS
    assert "r = 32" in GLUE_PARAMS_NOTE and "3.26" in GLUE_PARAMS_NOTE
