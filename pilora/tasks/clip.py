"""GOAT image-classification protocol on the CLIP ViT-B/32 image encoder.

The pieces, in the order a training script uses them::

    dsd = load_vision_dataset(*VISION_DATASETS["eurosat"])        # DatasetDict: image, label
    train, val = holdout_split(dsd["train"])                      # 10 % holdout, <= 5000
    train = prepare_dataset(train, train_transform())             # lazy pixel_values / labels
    val = prepare_dataset(val, eval_transform())
    model = CLIPImageClassifier.from_pretrained(DEFAULT_CLIP, num_classes(dsd))
    Trainer(model, args, train_dataset=train, eval_dataset=val, data_collator=collate)

The model is the transformers ``CLIPVisionModel`` (not open_clip) because its attention
and MLP are separate ``q_proj``/``k_proj``/``v_proj``/``out_proj``/``fc1``/``fc2`` linear
layers, which is what LoRA and its variants target (``conf/model/clip-vit-b32.yaml``).

Note for ``TrainingArguments``: set ``remove_unused_columns=False``. The transforms run
lazily inside ``Dataset.with_transform`` and need the raw ``image``/``label`` columns,
which the Trainer would otherwise drop because ``forward`` takes ``pixel_values``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import ImageClassifierOutput

DEFAULT_CLIP = "openai/clip-vit-base-patch32"

# Short task name -> (hub id, config name) passed to ``datasets.load_dataset``.
VISION_DATASETS: dict[str, tuple[str, str | None]] = {
    "cars": ("tanganke/stanford_cars", None),
    "dtd": ("tanganke/dtd", None),
    "eurosat": ("tanganke/eurosat", None),
    "gtsrb": ("tanganke/gtsrb", None),
    "resisc45": ("tanganke/resisc45", None),
    "sun397": ("tanganke/sun397", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
}

# OpenAI CLIP pre-processing statistics (the encoder was trained with these).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- model


def init_head(classifier: torch.nn.Linear) -> None:
    """The head as GOAT's ``CLIPForImageClassification`` starts it (transformers' CLIP init):
    weight ~ N(0, hidden^-0.5), bias 0. A private generator seeded from the torch seed makes the
    head a function of the seed alone, not of how much of the global RNG stream building the
    backbone (random init vs. checkpoint load, transformers vs. open_clip) happened to consume."""
    g = torch.Generator().manual_seed(torch.initial_seed())
    with torch.no_grad():
        classifier.weight.normal_(0.0, classifier.in_features**-0.5, generator=g)
        classifier.bias.zero_()


class CLIPImageClassifier(torch.nn.Module):
    """CLIP image encoder plus a linear head on the mean-pooled patch tokens.

    Attributes:
        clip: the ``transformers.CLIPVisionModel`` backbone.
        classifier: ``Linear(hidden_size, num_labels)`` applied to the pooled features.
        num_labels: number of classes.
    """

    def __init__(self, clip: CLIPVisionModel, num_labels: int, pool: str = "mean_patch"):
        """Wrap an existing ``CLIPVisionModel`` and create a fresh head for ``num_labels``.

        ``pool`` (a key of :data:`POOLING`): ``"mean_patch"`` averages the last hidden state's patch
        tokens as they are, as GOAT's ``CLIPForImageClassification`` does; ``"mean_patch_postln"``
        applies the backbone's ``post_layernorm`` to every patch token first; ``"cls"`` is CLIP's own
        pooled output (``post_layernorm`` of the CLS token).
        """
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if pool not in POOLING:
            raise ValueError(
                f"unknown pooling {pool!r} for the CLIP head; choose one of {sorted(POOLING)} (model.pool)"
            )
        self.clip = clip
        self.num_labels = num_labels
        self.pool = pool
        hidden = clip.config.hidden_size
        self.classifier = torch.nn.Linear(hidden, num_labels)
        init_head(self.classifier)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str = DEFAULT_CLIP, num_labels: int = 2, pool: str = "mean_patch", **kw: Any
    ) -> CLIPImageClassifier:
        """Load the vision tower with ``CLIPVisionModel.from_pretrained`` and add a new head.

        ``path_or_hub_id`` may be a full CLIP checkpoint (the text tower is ignored) or a
        vision-only one; ``kw`` goes to ``from_pretrained`` (e.g. ``dtype``, ``cache_dir``).
        """
        return cls(CLIPVisionModel.from_pretrained(path_or_hub_id, **kw), num_labels, pool)

    @classmethod
    def from_config(
        cls, vision_config: CLIPVisionConfig, num_labels: int, pool: str = "mean_patch"
    ) -> CLIPImageClassifier:
        """Build a randomly initialised backbone from ``vision_config`` (tests, smoke runs)."""
        return cls(CLIPVisionModel(vision_config), num_labels, pool)

    @property
    def post_layernorm(self) -> torch.nn.LayerNorm:
        """The backbone's final LayerNorm (older transformers nest it under ``vision_model``)."""
        inner = getattr(self.clip, "vision_model", self.clip)
        return inner.post_layernorm

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Mean over the patch tokens (CLS excluded) of the last hidden state (see ``pool``)."""
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, D], before the LayerNorm
        return POOLING[self.pool](hidden, self.post_layernorm)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: Any
    ) -> ImageClassifierOutput:
        """Return logits, and the cross-entropy loss when ``labels`` are given.

        Extra keyword arguments (e.g. ``num_items_in_batch`` from the Trainer) are ignored.
        """
        logits = self.classifier(self.features(pixel_values))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return ImageClassifierOutput(loss=loss, logits=logits)


# The head's input from the last block's tokens [B, 1 + P, D] (before the final LayerNorm) and that
# LayerNorm; shared by the transformers and the open_clip towers (``model.pool``).
POOLING: dict[str, Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]] = {
    # GOAT (transformers' CLIPForImageClassification): the patch tokens as they are, averaged
    "mean_patch": lambda tokens, ln: tokens[:, 1:].mean(dim=1),
    # CLIP applies its final LayerNorm to the CLS token only; applying it per patch token first puts
    # the tokens on one scale before averaging
    "mean_patch_postln": lambda tokens, ln: ln(tokens[:, 1:]).mean(dim=1),
    # CLIP's own pooled output
    "cls": lambda tokens, ln: ln(tokens[:, 0]),
}


class ZeroShotHead(torch.nn.Module):
    """CLIP's own classifier, frozen: ``logits = exp(logit_scale) · cos(W_proj f, t_c)`` for the
    image features ``f`` (CLIP's pooled output: ``post_layernorm`` of the CLS token) and the text
    embedding ``t_c`` of each class's prompt. Both sides are normalised as CLIP normalises them, so
    the logits at the start of training are CLIP's zero-shot ``logits_per_image``. It holds buffers
    only: nothing in it trains, and PEFT saves none of it (it is rebuilt from the checkpoint)."""

    def __init__(self, visual_projection_weight: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        if text_embeddings.ndim != 2 or visual_projection_weight.ndim != 2:
            raise ValueError("text_embeddings and visual_projection_weight must both be 2-D")
        if text_embeddings.shape[1] != visual_projection_weight.shape[0]:
            raise ValueError(
                f"text embedding dim {text_embeddings.shape[1]} does not match the visual "
                f"projection output dim {visual_projection_weight.shape[0]}"
            )
        self.register_buffer("projection", visual_projection_weight.detach().float().clone(), persistent=False)
        self.register_buffer("text", F.normalize(text_embeddings.detach().float(), dim=-1), persistent=False)
        self.logit_scale = float(logit_scale)

    @property
    def out_features(self) -> int:
        return self.text.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(features.float() @ self.projection.T, dim=-1)
        return self.logit_scale * image @ self.text.T


ZERO_SHOT_PROMPT = "a photo of a {}."  # CLIP's basic prompt (its paper's default template)


@torch.no_grad()
def zero_shot_classifier(
    path: str, class_names: Sequence[str], prompt: str = ZERO_SHOT_PROMPT, **kw: Any
) -> CLIPImageClassifier:
    """The image tower of the full CLIP checkpoint ``path`` with :class:`ZeroShotHead` built from
    its text tower and tokenizer on ``prompt.format(name)`` per class (the text tower is dropped
    afterwards). ``kw`` goes to ``from_pretrained`` (e.g. ``dtype``)."""
    from transformers import AutoTokenizer, CLIPModel

    full = CLIPModel.from_pretrained(path, **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer([prompt.format(name) for name in class_names], padding=True, return_tensors="pt")
    out = full.get_text_features(**inputs)
    text = out if torch.is_tensor(out) else out.pooler_output  # transformers >= 5: an output object
    model = CLIPImageClassifier(CLIPVisionModel.from_pretrained(path, **kw), len(class_names), pool="cls")
    model.classifier = ZeroShotHead(full.visual_projection.weight, text, full.logit_scale.exp().item())
    return model


# --------------------------------------------------------------------------- transforms


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # Module-level (not a lambda) so the transform pickles into DataLoader workers;
    # grey-scale / RGBA / palette images would otherwise give the wrong channel count.
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(image_size: int = 224) -> T.Compose:
    """Training augmentation: mild RandomResizedCrop (scale 0.9-1), ToTensor, CLIP normalisation."""
    return T.Compose(
        [
            _to_rgb,
            T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def eval_transform(image_size: int = 224) -> T.Compose:
    """Evaluation pre-processing: bicubic resize of the short side, centre crop, CLIP normalisation."""
    return T.Compose(
        [
            _to_rgb,
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def _decode(item: Any, position: int) -> PIL.Image.Image:
    """Turn a datasets image cell (PIL image, {'bytes','path'} dict or path) into a PIL image."""
    try:
        image = _open(item)
        image.load()  # PIL is lazy; force the decode here so the error is caught here
        return image
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        path = _image_path(item)
        where = f"path {path!r}, " if path else ""
        raise ValueError(f"could not decode image ({where}example {position} of the batch): {exc}") from exc


def _open(item: Any) -> PIL.Image.Image:
    """A datasets image cell (PIL image, {'bytes','path'} dict or path) opened, not yet decoded."""
    if isinstance(item, PIL.Image.Image):
        return item
    if isinstance(item, Mapping):
        data = item.get("bytes")
        return PIL.Image.open(io.BytesIO(data) if data is not None else item.get("path"))
    if isinstance(item, (str, os.PathLike)):
        return PIL.Image.open(os.fspath(item))
    raise TypeError(f"unsupported image value of type {type(item).__name__}")


def _image_path(item: Any) -> str | None:
    if isinstance(item, Mapping):
        return item.get("path")
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


class _TransformBatch:
    """The batched function of :func:`make_transform_fn`: a module-level class, not a closure, so a
    prepared dataset pickles into DataLoader workers started by spawn/forkserver (macOS, Python 3.14)."""

    def __init__(self, transform: Callable[[PIL.Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        pixels = [self.transform(_decode(item, i)).float() for i, item in enumerate(batch["image"])]
        out = {"pixel_values": pixels}
        if "label" in batch:
            out["labels"] = [int(x) for x in batch["label"]]
        return out


def make_transform_fn(transform: Callable[[PIL.Image.Image], torch.Tensor]) -> Callable[[dict], dict]:
    """Return a batched function for ``Dataset.with_transform``.

    It maps a batch ``{'image': [...], 'label': [...]}`` to
    ``{'pixel_values': [float tensors], 'labels': [ints]}``. Images that fail to decode
    raise ``ValueError`` naming the file path when the dataset stores one.
    """
    return _TransformBatch(transform)


def prepare_dataset(ds: datasets.Dataset, transform: Callable) -> datasets.Dataset:
    """Attach ``transform`` lazily to ``ds`` (columns ``image``/``label``).

    Automatic image decoding is switched off so that decoding happens inside
    ``make_transform_fn``, where a corrupt file can be reported with its path.
    """
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds.with_transform(make_transform_fn(transform))


def collate(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` into ``[B, 3, H, W]`` and ``labels`` into a long tensor."""
    out = {"pixel_values": torch.stack([torch.as_tensor(b["pixel_values"]) for b in batch])}
    if batch and "labels" in batch[0]:
        out["labels"] = torch.tensor([int(b["labels"]) for b in batch], dtype=torch.long)
    return out


# --------------------------------------------------------------------------- data


def holdout_split(
    train_ds: datasets.Dataset, fraction: float = 0.1, max_size: int = 5000, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a seeded holdout off the train split to use as validation.

    The holdout has ``min(round(fraction * len), max_size)`` examples (at least one, and
    at least one example is left to train on). Returns ``(train, validation)``: disjoint,
    together the whole input, and identical for the same ``seed``.
    """
    n = len(train_ds)
    if n < 2:
        raise ValueError(f"need at least 2 training examples to hold some out, got {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_val = min(max(1, round(fraction * n)), max_size, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted indices keep the on-disk order, so select() reads contiguous rows.
    val_idx = np.sort(perm[:n_val])
    train_idx = np.sort(perm[n_val:])
    return train_ds.select(train_idx), train_ds.select(val_idx)


def _is_url(p: str) -> bool:
    return "://" in p


def _looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a filesystem path rather than a hub id ``owner/name``."""
    if os.path.isabs(path) or path.startswith((".", "~")):
        return True
    if path.count("/") > 1 or os.sep != "/" and os.sep in path:
        return True
    return os.path.splitext(path)[1].lower() in {".parquet", ".arrow", ".csv", ".json", ".jsonl", ".zip", ".tar"}


def _hub_hint(path: str) -> str:
    base = os.path.basename(os.path.normpath(path)).lower()
    for key, (hub_id, name) in VISION_DATASETS.items():
        if key in base or hub_id.split("/")[-1] in base:
            extra = f" and task.dataset.name={name!r}" if name else ""
            return f"to download it from the Hugging Face Hub instead set task.dataset.path={hub_id!r}{extra}"
    known = ", ".join(f"{k}: {h}" for k, (h, _) in VISION_DATASETS.items())
    return f"to download from the Hugging Face Hub instead set task.dataset.path to a hub id ({known})"


def _iter_patterns(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    if isinstance(data_files, Mapping):
        return [p for v in data_files.values() for p in _iter_patterns(v)]
    return [os.fspath(p) for p in data_files]


def _check_local_inputs(path: str, data_dir: str | None, data_files: Any) -> None:
    """Raise FileNotFoundError for local paths that do not exist, before datasets does."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    packaged = path in _PACKAGED_DATASETS_MODULES
    if not packaged and not os.path.exists(path) and _looks_local(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist; {_hub_hint(path)}")
    if data_dir is not None and not _is_url(data_dir) and (packaged or os.path.isdir(path)):
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data_dir {data_dir!r} does not exist; {_hub_hint(data_dir)}")
    # data_files of a packaged builder are local (relative to data_dir or the cwd); for a
    # hub dataset they are relative to the repository, so they cannot be checked here.
    if packaged or os.path.isdir(path):
        base = data_dir if data_dir is not None else (path if os.path.isdir(path) else "")
        for p in _iter_patterns(data_files):
            if _is_url(p) or any(c in p for c in "*?["):
                continue
            full = p if os.path.isabs(p) else os.path.join(base, p)
            if not os.path.exists(full):
                raise FileNotFoundError(f"data file {full!r} does not exist; {_hub_hint(full)}")


def num_classes(ds: datasets.Dataset | datasets.DatasetDict) -> int:
    """Number of classes: from a ``ClassLabel`` ``label`` feature, else max label + 1."""
    splits = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
    for split in splits:
        feature = split.features.get("label")
        if isinstance(feature, datasets.ClassLabel):
            return feature.num_classes
    maxima = [int(np.max(np.asarray(s["label"]))) for s in splits if len(s)]
    if not maxima:
        raise ValueError("cannot infer the number of classes from an empty dataset")
    return max(maxima) + 1


class DatasetLoadError(OSError):
    """A vision dataset that ``datasets`` could not load (the message says what to do)."""


# fingerprints of dataset splits whose every image decoded (check_decodable): checked once per version
IMAGE_CHECK_CACHE = os.environ.get("PILORA_IMAGE_CHECK_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pilora", "decodable-images.json"
)


def _read_cache(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            cached = json.load(f)
        return cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        return {}


def _undecodable(item: Any) -> str | None:
    """Why one image cell does not decode (None: it does). A JPEG is decoded at 1/8 scale (``draft``):
    every byte is still read and entropy-decoded, so a truncated or corrupt file still fails."""
    try:
        image = _open(item)
        if image.format == "JPEG":
            image.draft("RGB", (1, 1))
        image.load()
        return None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad files
        where = _image_path(item)
        return f"{where!r} ({type(exc).__name__}: {exc})" if where else f"{type(exc).__name__}: {exc}"


def check_decodable(ds: datasets.Dataset, split: str, cache: str | None = None, workers: int | None = None) -> int:
    """Raise ``DatasetLoadError`` naming the images of ``ds`` that do not decode; return how many
    were decoded (0: this version of the split passed before). Run before the first step: a bad
    file found at the final evaluation costs the run, since fixing it changes the job's input files
    and the rerun cannot reuse the trained weights. A split is known by its ``datasets``
    fingerprint (which follows its files' paths and modification times), cached in ``cache``
    (:data:`IMAGE_CHECK_CACHE`); the decoding runs on ``workers`` threads (PIL decodes without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..io import atomic_write_json

    cache = cache or IMAGE_CHECK_CACHE
    key = getattr(ds, "_fingerprint", None)
    if key is not None and _read_cache(cache).get(key) == len(ds):
        return 0
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # the raw bytes / path, decoded here
    bad: list[str] = []
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        for batch in ds.select_columns(["image"]).iter(batch_size=512):
            bad += [why for why in pool.map(_undecodable, batch["image"]) if why]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise DatasetLoadError(
            f"{len(bad)} of {len(ds)} images of split {split!r} do not decode: {shown}. Replace or remove "
            "these files (nothing was trained)"
        )
    if key is not None:
        try:
            atomic_write_json(cache, {**_read_cache(cache), key: len(ds)}, indent=0, fsync=False)
        except OSError:  # a cache: a failed write only costs a second check
            pass
    return len(ds)


def check_labels(ds: datasets.Dataset | datasets.DatasetDict, n_classes: int | None = None) -> None:
    """Raise ValueError naming the first label outside ``[0, n_classes)`` (default ``num_classes(ds)``)."""
    n = num_classes(ds) if n_classes is None else n_classes
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("dataset", ds)]
    for split_name, split in splits:
        if not len(split):
            continue
        labels = np.asarray(split["label"])
        bad = np.flatnonzero((labels < 0) | (labels >= n))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"label {int(labels[i])} of example {i} in split {split_name!r} is outside "
                f"[0, {n}) ({bad.size} such labels); -1 usually marks an unlabelled split, "
                f"which cannot be used for training or evaluation"
            )


def _label_names(ds: datasets.DatasetDict) -> list[str]:
    names: set[str] = set()
    for split in ds.values():
        names.update(str(x) for x in split.unique("label"))
    return sorted(names)


def load_vision_dataset(
    path: str,
    name: str | None = None,
    data_files: Any = None,
    image_column: str = "image",
    label_column: str = "label",
    data_dir: str | None = None,
    splits: Sequence[str] | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """Load an image-classification dataset as a ``DatasetDict`` with ``image``/``label`` columns.

    ``path`` is anything ``datasets.load_dataset`` accepts (hub id, local directory,
    ``"imagefolder"`` with ``data_dir``/``data_files``) or a short name from
    ``VISION_DATASETS`` (``"eurosat"``, ...). ``load_kwargs`` go to ``load_dataset``
    (e.g. ``cache_dir``). Image columns holding file paths are cast to ``Image``; string
    labels become a ``ClassLabel`` with sorted names shared by all splits. ``splits``: load only
    these where the dataset has more (:func:`_only_splits`).

    Raises:
        FileNotFoundError: a local path / data_dir / data file does not exist.
        ValueError: a column is missing, or a label is outside ``[0, num_classes)``.
    """
    if path in VISION_DATASETS and not os.path.exists(path):
        path, default_name = VISION_DATASETS[path]
        name = name if name is not None else default_name
    _check_local_inputs(path, data_dir, data_files)
    if splits and data_files is None:
        data_files = _only_splits(path, name, data_dir, splits, load_kwargs)

    try:
        ds = datasets.load_dataset(path, name, data_dir=data_dir, data_files=data_files, **load_kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        raise DatasetLoadError(
            f"could not read the images of {path!r} ({err.__cause__ or err}); a file may be truncated "
            "or not an image: fix or remove it"
        ) from err
    except (ConnectionError, OSError) as err:  # the hub unreachable, or no such dataset there
        first = str(err).splitlines()[0] if str(err) else ""
        raise DatasetLoadError(
            f"could not load {path!r}{f' ({name})' if name else ''} ({type(err).__name__}: {first}). Without "
            "network access, pre-download it and point task.dataset.path at the local copy "
            "(or task.dataset.path=imagefolder with task.dataset.data_dir=<train/ and test/ class folders>)"
        ) from err
    if not isinstance(ds, datasets.DatasetDict):  # load_kwargs asked for one split
        ds = datasets.DatasetDict({str(load_kwargs.get("split", "train")): ds})

    folders = data_dir or (path if os.path.isdir(path) else "task.dataset.data_files")
    for split_name, split in ds.items():
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing == ["label"] == [label_column] and _from_folders(split):  # imagefolder added no labels
            raise ValueError(_no_class_folders(folders, split_name))
        if missing:
            raise ValueError(
                f"split {split_name!r} of {path!r} has no column(s) {missing}; columns present: "
                f"{split.column_names}. Set task.dataset.image_column and "
                f"task.dataset.label_column to the dataset's image and label columns."
            )
    for src, dst in ((image_column, "image"), (label_column, "label")):
        if src != dst:
            if dst in ds[next(iter(ds))].column_names:
                # The caller picked `src` explicitly; drop the unused namesake so the
                # rename does not fail on a duplicate column name.
                ds = ds.remove_columns(dst)
            ds = ds.rename_column(src, dst)

    features = ds[next(iter(ds))].features
    if isinstance(features["image"], datasets.Value) and features["image"].dtype in ("string", "large_string"):
        ds = ds.cast_column("image", datasets.Image())  # a column of file paths
    elif not isinstance(features["image"], datasets.Image):
        raise ValueError(f"column {image_column!r} has type {features['image']}, expected images or file paths")

    label_feature = features["label"]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        ds = ds.cast_column("label", datasets.ClassLabel(names=_label_names(ds)))
    elif not (
        isinstance(label_feature, datasets.ClassLabel)
        or (isinstance(label_feature, datasets.Value) and "int" in label_feature.dtype)
    ):
        raise ValueError(f"column {label_column!r} has type {label_feature}, expected integer class labels")

    if _from_folders(ds[next(iter(ds))]):
        _check_class_folders(ds, folders)
    check_labels(ds)
    return ds


def _only_splits(path, name, data_dir, splits: Sequence[str], load_kwargs: dict) -> dict | None:
    """The data files of ``splits`` alone, as ``datasets`` resolves them from the dataset's own
    metadata (nothing is downloaded for that), where it has other splits too: ``load_dataset``
    downloads and prepares every split of a config, and tanganke/eurosat, gtsrb and stanford_cars
    carry seven corrupted copies of their test set beside train and test (Cars: ~6 GB in all).
    None (load as is) where it has only these, lacks one of them (the caller names what it has),
    or cannot say."""
    try:
        builder = datasets.load_dataset_builder(path, name, data_dir=data_dir, **load_kwargs)
        files = dict(builder.config.data_files or {})
    except Exception:  # noqa: BLE001 - load_dataset below loads as is and reports what is wrong
        return None
    if not set(splits) <= set(files) or set(files) <= set(splits):
        return None
    return {split: list(files[split]) for split in splits}


def _from_folders(split: datasets.Dataset) -> bool:
    """Whether ``datasets`` labelled the images by their folders (imagefolder, or a local folder of images)."""
    return split.info.builder_name == "imagefolder"


def _no_class_folders(folders: str, split: str, why: str = "its images lie in fewer than two class folders") -> str:
    return (
        f"split {split!r} of {folders!r} has no class labels: {why}, and imagefolder labels each image by "
        f"the folder it lies in. Put each class's images in {split}/<class name>/ under {folders!r} "
        "(two classes or more; task.num_labels is their number)"
    )


def _check_class_folders(ds: datasets.DatasetDict, folders: str) -> None:
    """imagefolder gives a split labels only where its images lie in two or more folders: a split of
    one class folder (or of images lying directly in it) has None labels, and in a later split a
    split folder's name becomes a class of its own (the images of ``test/`` labelled "test")."""
    feature = ds[next(iter(ds))].features["label"]
    names = set(feature.names) if isinstance(feature, datasets.ClassLabel) else set()
    for split_name, split in ds.items():
        if split_name in names:
            raise ValueError(_no_class_folders(folders, split_name, f"its images lie in {split_name}/ itself"))
        if None in split.unique("label"):
            raise ValueError(_no_class_folders(folders, split_name))
