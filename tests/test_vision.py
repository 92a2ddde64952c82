"""Tests for pilora.tasks.clip and the vision task: tiny CLIP configs and PNGs written to tmp dirs, no downloads."""

import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from pilora.paper_params import model_targets
from pilora.tasks import clip as V

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


def tiny_config(**changes) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{**TINY, **changes})


def write_imagefolder(root, n_per_class=6, size=40):
    """Two separable classes, 'blue' (label 0) and 'red' (label 1), with a little noise."""
    rng = np.random.default_rng(0)
    colours = {"blue": (20, 40, 220), "red": (220, 30, 30)}
    for cls, rgb in colours.items():
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n_per_class):
            arr = np.clip(np.array(rgb) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return write_imagefolder(tmp_path / "imgs")


def load_folder(folder, tmp_path, **kw):
    return V.load_vision_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "cache"), **kw)


# --------------------------------------------------------------------------- model


def test_pooled_features_are_mean_of_patch_tokens_without_cls():
    torch.manual_seed(0)
    model = V.CLIPImageClassifier.from_config(tiny_config(), num_labels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model.clip(pixel_values=x).last_hidden_state
        assert hidden.shape == (2, 1 + 16, 32)
        manual = torch.stack([hidden[b, 1:].sum(0) / 16 for b in range(2)])  # GOAT: no post_layernorm
        with_cls = hidden.mean(1)
        feats = model.features(x)
        out = model(x)
    torch.testing.assert_close(feats, manual)
    assert not torch.allclose(feats, with_cls, atol=1e-4)  # CLS really is excluded
    torch.testing.assert_close(out.logits, model.classifier(manual))
    assert out.logits.shape == (2, 3) and out.loss is None


def test_loss_matches_cross_entropy_and_head_is_seed_deterministic():
    torch.manual_seed(1)
    a = V.CLIPImageClassifier.from_config(tiny_config(), 4)
    torch.manual_seed(1)
    b = V.CLIPImageClassifier.from_config(tiny_config(), 4)
    torch.manual_seed(2)
    c = V.CLIPImageClassifier.from_config(tiny_config(), 4)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert torch.equal(a.classifier.bias, b.classifier.bias)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    out = a(x, labels=y)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))


def test_head_starts_as_goats_clip_for_image_classification():
    """GOAT's head is transformers' CLIPForImageClassification: weight ~ N(0, hidden^-0.5), bias 0."""
    from transformers import CLIPConfig, CLIPForImageClassification

    hidden = 768
    torch.manual_seed(0)
    ours = V.CLIPImageClassifier.from_config(tiny_config(hidden_size=hidden), 400)
    cfg = CLIPConfig(vision_config=tiny_config(hidden_size=hidden).to_dict(), num_labels=400)
    ref = CLIPForImageClassification(cfg).classifier
    assert torch.equal(ours.classifier.bias, torch.zeros(400)) and torch.equal(ref.bias, torch.zeros(400))
    for head in (ours.classifier, ref):
        assert abs(head.weight.std().item() / hidden**-0.5 - 1) < 0.02
        assert abs(head.weight.mean().item()) < 1e-3


def test_from_pretrained_loads_vision_tower_of_full_clip_checkpoint(tmp_path):
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=8,
    )
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=16))
    full.save_pretrained(tmp_path / "clip")
    model = V.CLIPImageClassifier.from_pretrained(str(tmp_path / "clip"), num_labels=5)
    assert isinstance(model.clip, CLIPVisionModel) and model.classifier.out_features == 5
    ref = dict(full.vision_model.named_parameters())
    got = dict(model.clip.named_parameters())
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def tiny_full_clip(folder):
    """A tiny full CLIP checkpoint (both towers, projection, logit scale) and a character-level CLIP
    tokenizer, written to ``folder``: what ``task.head=zeroshot`` loads."""
    import json
    import string

    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in [*string.ascii_lowercase, "."]:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
    text = dict(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=8)).save_pretrained(folder)
    return str(folder)


def test_zero_shot_head_is_clips_own_zero_shot_classifier(tmp_path):
    """At the start of training the zero-shot model's logits are CLIP's logits_per_image for the
    class prompts; its head holds no parameter (nothing of it trains or is saved)."""
    from transformers import AutoTokenizer

    path = tiny_full_clip(tmp_path / "clip")
    model = V.zero_shot_classifier(path, ["red", "blue", "green"]).eval()
    assert not list(model.classifier.parameters()) and model.pool == "cls"
    px = torch.randn(4, 3, 32, 32)
    clip = CLIPModel.from_pretrained(path).eval()
    prompts = AutoTokenizer.from_pretrained(path)(
        ["a photo of a red.", "a photo of a blue.", "a photo of a green."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        want = clip(**prompts, pixel_values=px).logits_per_image
        torch.testing.assert_close(model(px).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        V.ZeroShotHead(torch.randn(8, 32), torch.randn(3, 5), 1.0)


def test_zero_shot_head_trains_only_the_adapters_and_reloads(tmp_path):
    """``task.head=zeroshot``: a run trains LoRA alone under the frozen text head (no head in the
    adapter), and the reloaded adapter reproduces the trained model's test scores."""
    from helpers import FAST, compose_cfg, write_images
    from safetensors.torch import load_file

    from pilora.runner.train import train

    path = tiny_full_clip(tmp_path / "clip")
    over = FAST + write_images(str(tmp_path / "img")) + ["model.from_config=null", f"model.path={path}"]
    over += ["task.head=zeroshot", "task.class_names=[red,blue]", "method=lora", "trainer.max_steps=3"]
    rec = train(compose_cfg(over, tmp_path / "run"))
    assert (
        rec["status"] == "complete" and rec["evaluation"]["head"] == "zeroshot" and rec["evaluation"]["pool"] == "cls"
    )
    assert rec["params"]["trainable"] == rec["params"]["adapter"] > 0  # no head trained in full
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    from pilora.runner.evaluate import evaluate

    again = evaluate(str(tmp_path / "run"))  # the head rebuilt from the checkpoint, the adapter loaded
    for key in ("test_accuracy", "test_loss"):
        assert again["metrics"]["test"][key] == pytest.approx(rec["metrics"]["test"][key], rel=1e-5)
    from pilora.tasks.vision import VisionSettings

    with pytest.raises(
        ValueError, match=r"task\.head='zeroshoot' is not a head; choose one of \['linear', 'zeroshot'\]"
    ):
        VisionSettings.from_dict({"name": "eurosat", "family": "vision", "num_labels": 2, "head": "zeroshoot"})
    with pytest.raises(ValueError, match="full transformers CLIP checkpoint"):
        train(compose_cfg(FAST + write_images(str(tmp_path / "img")) + ["task.head=zeroshot"], tmp_path / "o"))


def test_peft_lora_targets_all_clip_linears():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = V.CLIPImageClassifier.from_config(tiny_config(), num_labels=3)
    r = 2
    expected = sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in model_targets("clip-vit-b32")
    )
    # 2 layers x (4 attention 32x32 + fc1 32->64 + fc2 64->32)
    assert expected == 2 * (4 * r * 64 + 2 * r * 96)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=4, target_modules=model_targets("clip-vit-b32"), modules_to_save=["classifier"]
    )
    pm = peft.get_peft_model(model, cfg)
    lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert lora == expected
    trainable = {n: p.numel() for n, p in pm.named_parameters() if p.requires_grad}
    head = sum(v for n, v in trainable.items() if "classifier" in n)
    assert head == 32 * 3 + 3
    assert sum(trainable.values()) == expected + head
    out = pm(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    out.loss.backward()


# --------------------------------------------------------------------------- transforms


def test_eval_transform_constant_colour_normalises_exactly():
    rgb = (255, 0, 128)
    img = Image.new("RGB", (50, 37), rgb)
    x = V.eval_transform(24)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(rgb, V.CLIP_MEAN, V.CLIP_STD)]
    for ch in range(3):
        torch.testing.assert_close(x[ch], torch.full((24, 24), expected[ch]), atol=1.5 / 255 / 0.26, rtol=0)


def test_train_transform_shape_and_rgb_conversion():
    torch.manual_seed(0)
    grey = Image.new("L", (40, 60), 128)
    x = V.train_transform(32)(grey)
    assert x.shape == (3, 32, 32)
    rgba = Image.new("RGBA", (33, 33), (1, 2, 3, 4))
    assert V.eval_transform(16)(rgba).shape == (3, 16, 16)


# --------------------------------------------------------------------------- data


def test_holdout_split_disjoint_deterministic_and_capped():
    ds = datasets.Dataset.from_dict({"idx": list(range(200)), "label": [i % 3 for i in range(200)]})
    tr, va = V.holdout_split(ds, seed=3)
    assert len(va) == 20 and len(tr) == 180
    assert set(tr["idx"]).isdisjoint(va["idx"])
    assert set(tr["idx"]) | set(va["idx"]) == set(range(200))
    tr2, va2 = V.holdout_split(ds, seed=3)
    assert list(va2["idx"]) == list(va["idx"]) and list(tr2["idx"]) == list(tr["idx"])
    _, va3 = V.holdout_split(ds, seed=4)
    assert list(va3["idx"]) != list(va["idx"])
    _, capped = V.holdout_split(ds, fraction=0.5, max_size=7)
    assert len(capped) == 7


def test_imagefolder_training_loss_decreases(folder, tmp_path):
    dsd = load_folder(folder, tmp_path)
    assert set(dsd["train"].column_names) >= {"image", "label"}
    assert V.num_classes(dsd) == 2
    train = V.prepare_dataset(dsd["train"], V.eval_transform(32))
    batch = V.collate([train[i] for i in range(len(train))])
    assert batch["pixel_values"].shape == (12, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and sorted(batch["labels"].tolist()) == [0] * 6 + [1] * 6

    torch.manual_seed(0)
    model = V.CLIPImageClassifier.from_config(tiny_config(), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.3, losses


def test_renames_columns_and_encodes_string_labels(tmp_path):
    paths = []
    for i, rgb in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), rgb).save(p)
        paths.append(str(p))
    csv = tmp_path / "train.csv"
    csv.write_text("file,cls\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, ["red", "blue", "green"])))
    dsd = V.load_vision_dataset(
        "csv",
        data_files={"train": str(csv)},
        image_column="file",
        label_column="cls",
        cache_dir=str(tmp_path / "cache"),
    )
    tr = dsd["train"]
    assert tr.column_names == ["image", "label"]
    assert tr.features["label"].names == ["blue", "green", "red"] and tr["label"] == [2, 0, 1]
    assert V.num_classes(dsd) == 3
    assert tr[0]["image"].size == (8, 8)


def test_missing_local_path_names_path_and_hub_id(tmp_path):
    missing = str(tmp_path / "data" / "eurosat")
    with pytest.raises(FileNotFoundError) as e:
        V.load_vision_dataset(missing)
    assert missing in str(e.value) and "tanganke/eurosat" in str(e.value)
    with pytest.raises(FileNotFoundError, match="svhn.*cropped_digits"):
        V.load_vision_dataset("imagefolder", data_dir=str(tmp_path / "svhn"))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        V.load_vision_dataset("imagefolder", data_files={"train": [str(tmp_path / "nope.png")]})


def test_missing_columns_lists_present_columns_and_config_keys(folder, tmp_path):
    with pytest.raises(ValueError) as e:
        load_folder(folder, tmp_path, image_column="img")
    msg = str(e.value)
    assert "'img'" in msg and "'image'" in msg and "'label'" in msg
    assert "task.dataset.image_column" in msg and "task.dataset.label_column" in msg


def test_label_out_of_range_names_the_label(tmp_path):
    img = {"bytes": None, "path": None}
    buf = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(buf)
    img["path"] = str(buf)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [img] * 3, "label": [0, -1, 1]}, features=feats)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(ValueError, match=r"label -1 of example 1 .*\[0, 2\)"):
        V.load_vision_dataset(
            "parquet", data_files={"train": str(tmp_path / "train.parquet")}, cache_dir=str(tmp_path / "cache")
        )
    ok = datasets.Dataset.from_dict({"label": [0, 1, 7, 2]})
    assert V.num_classes(ok) == 8
    with pytest.raises(ValueError, match="label 7 of example 2"):
        V.check_labels(ok, n_classes=3)


def test_undecodable_image_names_path(folder, tmp_path):
    bad = folder / "red" / "broken.png"
    bad.write_bytes(b"definitely not a png")
    dsd = load_folder(folder, tmp_path)
    ds = V.prepare_dataset(dsd["train"], V.eval_transform(32))
    idx = [
        i
        for i, p in enumerate(dsd["train"].cast_column("image", datasets.Image(decode=False))["image"])
        if p["path"] and p["path"].endswith("broken.png")
    ]
    assert idx
    with pytest.raises(ValueError, match="broken.png"):
        ds[idx[0]]


def test_vision_dataset_defaults():
    assert set(V.VISION_DATASETS) == {"cars", "dtd", "eurosat", "gtsrb", "resisc45", "sun397", "svhn"}
    assert V.VISION_DATASETS["svhn"] == ("ufldl-stanford/svhn", "cropped_digits")
    assert all(hub.startswith("tanganke/") for k, (hub, n) in V.VISION_DATASETS.items() if k != "svhn")


def test_the_holdout_is_the_same_for_every_run_seed(tmp_path):
    """The seeds of a Table 3 cell differ in training randomness, not in the images they train on;
    task.holdout_seed moves the holdout."""
    from helpers import compose_cfg, write_images
    from omegaconf import OmegaConf

    from pilora.tasks.base import make_task

    over = write_images(str(tmp_path / "img"), n=40)

    def held(seed, holdout_seed=0):
        cfg = OmegaConf.to_container(compose_cfg(over + [f"seed={seed}", f"task.holdout_seed={holdout_seed}"]))
        task = make_task(cfg["task"], cfg["model"], seed=seed)
        return sorted(float(np.asarray(ex["pixel_values"]).sum()) for ex in task.datasets()["validation"])

    assert len(held(0)) == 10 and held(0) == held(1)
    assert held(0) != held(0, holdout_seed=1)


def _vision_task(tmp_path, *extra):
    from helpers import compose_cfg, write_images
    from omegaconf import OmegaConf

    from pilora.tasks.base import make_task

    over = write_images(str(tmp_path / "img"), n=8)
    cfg = OmegaConf.to_container(compose_cfg(over + list(extra)))
    return make_task(cfg["task"], cfg["model"])


def test_a_missing_test_split_is_named_unless_the_task_opts_out(tmp_path):
    """Table 3 reports the test split: data without one is an error before training (a run would
    otherwise end 'complete' with no headline number); task.splits.test=null opts out on purpose."""
    import shutil

    from pilora.tasks.base import DataError

    task = _vision_task(tmp_path)
    shutil.rmtree(tmp_path / "img" / "test")
    with pytest.raises(DataError, match=r"needs a test split 'test'; the data has \['train'\].*task\.splits\.test"):
        task.datasets()
    assert _vision_task(tmp_path, "task.splits.test=null").datasets()["test"] is None


def test_num_labels_must_equal_the_datas_classes(tmp_path):
    """A head with 196 outputs on 2-class data trains 194 dead logits without a word."""
    from pilora.tasks.base import DataError

    with pytest.raises(DataError, match=r"the data has 2 classes but task\.num_labels is 196"):
        _vision_task(tmp_path, "task.num_labels=196").datasets()


@pytest.mark.parametrize("fraction", [0, 1.0, 1.5])
def test_holdout_fraction_outside_the_open_unit_interval_is_named(tmp_path, fraction):
    from pilora.tasks.base import make_task  # noqa: F401 (the task registry)
    from pilora.tasks.vision import VisionSettings

    cfg = {"name": "eurosat", "family": "vision", "num_labels": 2, "holdout_fraction": fraction}
    with pytest.raises(ValueError, match=rf"task\.holdout_fraction must lie strictly between 0 and 1, got {fraction}"):
        VisionSettings.from_dict(cfg)


def test_an_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    """Offline, a vision task on its hub id: one error naming the dataset and the local-copy fix,
    not datasets' ConnectionError traceback."""
    from pilora.tasks.base import DataError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    task = _vision_task(tmp_path, "task.dataset.path=tanganke/eurosat", "task.dataset.data_dir=null")
    with pytest.raises(DataError, match=r"could not load 'tanganke/eurosat'.*pre-download it.*task\.dataset\.path"):
        task.datasets()


def test_prepared_datasets_pickle_into_spawned_dataloader_workers(folder, tmp_path):
    """spawn / forkserver workers (macOS, Python 3.14's default) receive the dataset pickled."""
    import pickle

    ds = V.prepare_dataset(load_folder(folder, tmp_path)["train"], V.eval_transform(32))
    again = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(torch.as_tensor(again[0]["pixel_values"]), torch.as_tensor(ds[0]["pixel_values"]))


def test_every_image_is_decoded_once_per_version_of_a_split(folder, tmp_path):
    """check_decodable names every file that does not decode (a truncated JPEG included, though
    JPEGs decode at 1/8 scale), passes a good split and skips it the next time; a changed file
    makes a new version, checked again."""
    cache = str(tmp_path / "checked.json")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "red" / "whole.jpg", quality=90)
    data = (folder / "red" / "whole.jpg").read_bytes()
    good = load_folder(folder, tmp_path)["train"]
    assert V.check_decodable(good, "train", cache=cache, workers=2) == len(good) == 13
    assert V.check_decodable(good, "train", cache=cache) == 0  # this version passed: not decoded again
    (folder / "red" / "whole.jpg").write_bytes(data[: len(data) // 2])  # cut short, as a failed copy leaves it
    (folder / "blue" / "0.png").write_bytes(b"not a png")
    bad = load_folder(folder, tmp_path)["train"]
    with pytest.raises(V.DatasetLoadError) as err:
        V.check_decodable(bad, "train", cache=cache, workers=2)
    message = str(err.value)
    assert message.startswith("2 of 13 images of split 'train' do not decode: ")
    assert "whole.jpg' (OSError: Truncated File Read)" in message and "0.png' (UnidentifiedImageError" in message
    with pytest.raises(V.DatasetLoadError):  # a failed version is not cached
        V.check_decodable(bad, "train", cache=cache)


def test_a_bad_test_image_stops_the_job_before_training_and_the_fix_reuses_the_folder(tmp_path):
    """A corrupt test image found at the final evaluation would cost the run (fixing it changes the
    job's inputs, so the rerun cannot reuse the weights): it stops the job before the first step,
    and once fixed the same command trains in the same folder."""
    from helpers import FAST, compose_cfg, write_images

    from pilora.runner.train import train
    from pilora.tasks.base import DataError

    over = FAST + write_images(str(tmp_path / "img")) + ["method=lora", "trainer.max_steps=2", "save_adapter=false"]
    (tmp_path / "img" / "test" / "1" / "2.png").write_bytes(b"")
    out = tmp_path / "run"
    with pytest.raises(
        DataError, match=r"task 'eurosat': 1 of 8 images of split 'test' do not decode: .*test/1/2\.png"
    ):
        train(compose_cfg(over, out))
    assert not (out / "train").exists() and not (out / "training.json").exists()  # nothing trained
    write_images(str(tmp_path / "img"))  # the file fixed
    record = train(compose_cfg(over, out))
    assert record["status"] == "complete" and record["metrics"]["test"]["test_accuracy"] is not None


@pytest.mark.parametrize("layout", ["one_class", "no_class_folders"])
def test_an_image_folder_without_two_class_folders_is_named(tmp_path, layout):
    """train/ with a single class folder was `TypeError: '<' not supported between 'NoneType' and
    'int'` in check_labels (imagefolder leaves such a split unlabelled); images lying directly in
    train/ and test/ would even have been labelled by their split folder. Both: one message naming
    the split, the folder and the fix."""
    import shutil

    from helpers import write_images

    write_images(str(tmp_path / "img"))
    root = tmp_path / "img"
    if layout == "one_class":
        shutil.rmtree(root / "train" / "1")
        why = "its images lie in fewer than two class folders"
    else:
        for split in ("train", "test"):
            for png in (root / split).glob("*/*.png"):
                png.rename(root / split / f"{png.parent.name}-{png.name}")
            for sub in ("0", "1"):
                (root / split / sub).rmdir()
        why = "its images lie in train/ itself"
    with pytest.raises(ValueError) as err:
        load_folder(root, tmp_path)
    assert str(err.value) == (
        f"split 'train' of '{root}' has no class labels: {why}, and imagefolder labels each image by the folder "
        f"it lies in. Put each class's images in train/<class name>/ under '{root}' (two classes or more; "
        "task.num_labels is their number)"
    )


def test_a_single_class_image_folder_stops_the_job_before_training(tmp_path):
    import shutil

    from helpers import FAST, compose_cfg, write_images

    from pilora.runner.errors import expected_message
    from pilora.runner.train import train

    over = FAST + write_images(str(tmp_path / "img")) + ["trainer.max_steps=2"]
    shutil.rmtree(tmp_path / "img" / "train" / "1")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"split 'train' of .* has no class labels") as err:
        train(compose_cfg(over, out))
    assert expected_message(err.value) == str(err.value)  # one `error:` line, no traceback
    assert not (out / "results.json").exists() and not (out / "training.json").exists()


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-clip-openclip", "zeroshot"])
def test_model_dtype_sets_the_vision_towers_weights(tmp_path, model):
    """model.dtype=bfloat16 loads a vision model's weights in bf16, as it does a text model's (it
    was ignored: the tower stayed fp32), and the bf16 model takes the fp32 images the transform
    makes; its logits are the fp32 model's to bf16 rounding."""
    extra = [f"model={model}"]
    if model == "zeroshot":
        path = tiny_full_clip(tmp_path / "clip")
        extra = ["model.from_config=null", f"model.path={path}", "task.head=zeroshot", "task.class_names=[red,blue]"]
    px = torch.rand(4, 3, 32, 32)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        task = _vision_task(tmp_path, *extra, f"model.dtype={dtype}")
        torch.manual_seed(0)  # the same random tower (from_config) and head for both
        built = task.build_model().eval()
        assert {p.dtype for p in built.parameters()} == {getattr(torch, dtype)}
        with torch.no_grad():
            logits[dtype] = built(pixel_values=px).logits.float()
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=0.05, rtol=0.05)
    assert not torch.equal(logits["bfloat16"], logits["float32"])  # computed in bf16, not cast back to fp32


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-clip", "tiny-clip-openclip"])
def test_a_bf16_vision_run_learns_with_fp32_adapters(tmp_path, model):
    """model.dtype=bfloat16 end to end: both PiLoRA stages train on the bf16 tower and the saved
    adapter is fp32 (PEFT's autocast_adapter_dtype), and the eval loss falls."""
    from helpers import FAST, compose_cfg, write_images
    from safetensors.torch import load_file

    from pilora.runner.train import train

    over = FAST + write_images(str(tmp_path / "img")) + [f"model={model}", "model.dtype=bfloat16", "method=pilora"]
    rec = train(compose_cfg(over + ["method.r=3", "trainer.num_train_epochs=3"], tmp_path / "run"))
    assert rec["status"] == "complete" and rec["epochs"][-1]["eval_loss"] < rec["epochs"][0]["eval_loss"]
    saved = load_file(tmp_path / "run" / "adapter_pilora" / "pilora_model.safetensors")
    adapters = {k: t for k, t in saved.items() if "lora_" in k and t.is_floating_point()}  # not the int8 masks
    assert adapters and {t.dtype for t in adapters.values()} == {torch.float32}


def _hub_layout(root, extra_splits=("contrast", "gaussian_noise"), readable=False):
    """A dataset laid out as tanganke's hub copies are: parquet files per split, named in the card's
    ``configs``, with corrupted copies of the test set as further splits; unless ``readable``, those
    files here are not parquet at all, so reading one fails."""
    import io

    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    rows = {"image": [png("red"), png("blue")] * 6, "label": [0, 1] * 6}
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(os.path.join(root, "data", f"{split}.parquet"))
    for split in extra_splits:
        if readable:
            datasets.Dataset.from_dict(rows, features=features).to_parquet(
                os.path.join(root, "data", f"{split}.parquet")
            )
            continue
        with open(os.path.join(root, "data", f"{split}.parquet"), "wb") as f:
            f.write(b"not read unless the split is loaded")
    entries = "".join(f"  - split: {s}\n    path: data/{s}.parquet\n" for s in ("train", "test", *extra_splits))
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(f"---\nconfigs:\n- config_name: default\n  data_files:\n{entries}---\n")
    return str(root)


def test_only_the_train_and_test_splits_are_loaded(tmp_path):
    """load_dataset prepares every split of a config: the hub's eurosat / gtsrb / cars also carry
    corrupted test copies (Cars: ~6 GB in all), downloaded and read for nothing. The task loads its
    train and test splits alone (a bad file in another split was an error here); a split it needs
    and the data lacks is still named with the splits the data has."""
    from helpers import compose_cfg
    from omegaconf import OmegaConf

    from pilora.tasks import DataError
    from pilora.tasks.base import make_task

    root = _hub_layout(tmp_path / "hub")
    over = ["task=vision/eurosat", "model=tiny-clip", f"task.dataset.path={root}", "task.dataset.name=default"]
    over += ["task.num_labels=2", "task.holdout_fraction=0.25"]
    cfg = OmegaConf.to_container(compose_cfg(over, tmp_path / "o"), resolve=True)
    data = make_task(cfg["task"], cfg["model"]).datasets()
    assert len(data["train"]) + len(data["validation"]) == 12 and len(data["test"]) == 12
    cfg["task"]["splits"]["test"] = "snow"
    cfg["task"]["dataset"]["path"] = _hub_layout(tmp_path / "hub2", readable=True)
    with pytest.raises(
        DataError, match=r"needs a test split 'snow'; the data has \['train', 'test', 'contrast', 'gaussian_noise'\]"
    ):
        make_task(cfg["task"], cfg["model"]).datasets()
