import pytest

from pilora.params import meta_count

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("setting,count,share", [
    ("LLaMA2-7B", 56_098_816, 0.83), ("LLaMA3-8B", 56_623_104, 0.70),
    ("CLIP ViT-B/32 image encoder", 1_327_104, 1.49)])
def test_design_table_lora_counts_on_meta_device(setting, count, share):
    c = meta_count(setting)
    assert c.adapter == count
    assert round(100 * c.adapter_share, 2) == share


def test_roberta_large_both_conventions():
    c = meta_count("RoBERTa-large")
    assert c.adapter == 14_155_776
    assert round(100 * c.adapter_share_of_backbone, 2) == 4.00   # GOAT: of the 354.3 M backbone
    assert round(100 * c.adapter_share, 2) == 3.83               # PEFT-style, head included
    assert round(c.backbone / 1e6, 1) == 354.3


def test_pilora_top_half_share():
    c = meta_count("LLaMA2-7B", "pilora", dominant_fraction=0.5)
    # (r+r')·n + |M|·r + (m−|M|)·r' summed over the 160 target layers
    per_layer = (3 * (34 * 4096 + 2048 * 34) + (34 * 4096 + 5504 * 34) + (34 * 11008 + 2048 * 34))
    assert c.adapter == 32 * per_layer
    assert round(100 * c.adapter_share, 2) == 0.66
