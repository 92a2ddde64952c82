import torch

from helpers import FAST, compose_cfg, write_images
from pilora.budget import matched_rank_pattern, pilora_module_count
from pilora.train import train


def test_matched_ranks_against_hand_computed_counts():
    masks = {"up": torch.tensor([True] * 6 + [False] * 10), "down": torch.tensor([True] * 3 + [False] * 9)}
    shapes = {"up": (16, 10), "down": (12, 16)}
    pattern, budget = matched_rank_pattern(masks, shapes, r=4, r_s=1)
    # up: (4+1)·10 + 6·4 + 10·1 = 84 → 84/26 = 3.23 → k = 3 (78 params)
    # down: (4+1)·16 + 3·4 + 9·1 = 101 → 101/28 = 3.61 → k = 4 (112 params)
    assert pilora_module_count(16, 10, 6, 4, 1) == 84 and pilora_module_count(12, 16, 3, 4, 1) == 101
    assert pattern == {"up": 3, "down": 4}
    assert budget["pilora_adapter_params"] == 185 and budget["lora_adapter_params"] == 190
    assert budget["residual"] == 5


def test_matched_lora_run_records_its_budget(tmp_path):
    cfg = compose_cfg(FAST + write_images(str(tmp_path / "img")) + [
        "method=lora_matched", "method.r=4", "method.supplementary_r=1", "method.stage1.max_steps=3",
        "method.importance_interval=1", "trainer.max_steps=3"], tmp_path / "run")
    rec = train(cfg)
    b = rec["budget_match"]
    assert rec["method"] == "lora_matched" and b["ranks"]
    assert rec["params"]["adapter"] == b["lora_adapter_params"]  # the model really has those ranks
    from pilora import ImportanceStats
    shapes = [s.shape for s in ImportanceStats.load(b["importance_file"]).modules.values()]
    # rounding each module's rank moves it by at most half a rank step, (m + n) / 2 parameters
    assert abs(b["residual"]) <= sum((m + n) / 2 for m, n in shapes)
    assert len(b["ranks"]) == len(shapes) and all(k >= 1 for k in b["ranks"].values())
