"""Image classification with the CLIP ViT-B/32 image encoder (the GOAT protocol)."""

from __future__ import annotations

import dataclasses
import logging

import datasets
import numpy as np

from . import clip as v
from .base import DataError, Task, check_model_path, model_dtype, register_family
from .schema import TaskSettings, setting

log = logging.getLogger("pilora")

HEADS = ("linear", "zeroshot")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionSettings(TaskSettings):
    """``task.*`` of an image-classification task. ``dataset`` holds path, name, data_files,
    data_dir, image_column (default image) and label_column (default label)."""

    num_labels: int = setting(low=1, help="classes of the head (the data's labels are 0..num_labels-1)")
    holdout_fraction: float = setting(0.1, low=0, help="seeded share of train held out for validation")
    holdout_max: int = setting(5000, low=1, help="cap on the validation holdout (examples)")
    holdout_seed: int = setting(
        0, low=0, help="seed of the holdout, not the run's seed: every seed trains on the same images"
    )
    head: str = setting(
        "linear",
        help="linear: a linear head on the pooled tokens, trained in full (GOAT); zeroshot: CLIP's frozen "
        "text embeddings of `prompt` per class (CLS pooling, only the adapters train)",
    )
    prompt: str = setting(v.ZERO_SHOT_PROMPT, help="head=zeroshot: the text of each class ({} = its name)")
    class_names: list | None = setting(None, help="head=zeroshot: the classes' names (null: the label column's)")

    def __post_init__(self):
        super().__post_init__()
        if self.head not in HEADS:  # checked with the config, before any data loads
            raise ValueError(f"task.head={self.head!r} is not a head; choose one of {list(HEADS)}")


@register_family("vision")
class VisionTask(Task):
    """Train split minus a seeded 10 % holdout (≤ 5000) for validation; top-1 on the test split."""

    model_families = ("clip_vision",)
    example_model = "clip-vit-b32"
    remove_unused_columns = False  # the image transform needs the raw columns
    settings_cls = VisionSettings

    def build_model(self):
        """The image classifier with its weights in ``model.dtype`` (the new head too, as a text
        model's head loads in its ``dtype``); the zero-shot head keeps its fp32 text embeddings."""
        import torch

        dtype = getattr(torch, model_dtype(self.model_cfg))
        if self.zero_shot:
            return self._zero_shot_model(dtype)
        model = self._trainable_model()
        return model if dtype == torch.float32 else model.to(dtype)

    def _trainable_model(self):
        from transformers import CLIPVisionConfig

        n = self.settings.num_labels
        if self.model_cfg.get("backend") == "open_clip":  # model=clip-vit-b32-openclip (pilora.tasks.openclip)
            from .openclip import build_classifier

            return build_classifier(self.model_cfg, n)
        if self.model_cfg.get("from_config"):
            spec = {k: val for k, val in self.model_cfg["from_config"].items() if k != "model_type"}
            return v.CLIPImageClassifier.from_config(CLIPVisionConfig(**spec), n, pool=self.pool)
        check_model_path(self.model_cfg)
        try:
            return v.CLIPImageClassifier.from_pretrained(self.model_cfg["path"], num_labels=n, pool=self.pool)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load model {self.model_cfg['path']!r} ({err}); without network "
                "access, pre-download it and set model.path to the local directory"
            ) from err

    @property
    def zero_shot(self) -> bool:
        return self.settings.head == "zeroshot"

    def _zero_shot_model(self, dtype):
        if self.model_cfg.get("backend") == "open_clip" or self.model_cfg.get("from_config"):
            raise ValueError(
                "task.head=zeroshot builds its head from CLIP's text tower and tokenizer: set model.path to a "
                "full transformers CLIP checkpoint (e.g. model=clip-vit-b32, openai/clip-vit-base-patch32)"
            )
        check_model_path(self.model_cfg)
        names = self.class_names
        if len(names) != self.settings.num_labels:
            raise DataError(
                f"task.head=zeroshot: {len(names)} class names for task.num_labels={self.settings.num_labels}"
            )
        return v.zero_shot_classifier(self.model_cfg["path"], names, self.settings.prompt, dtype=dtype)

    @property
    def class_names(self) -> list[str]:
        """``task.class_names``, else the label column's names (read by :meth:`datasets`)."""
        names = self.settings.class_names or getattr(self, "_label_names", None)
        if not names:
            raise DataError(
                f"task {self.name!r}: task.head=zeroshot needs the classes' names and the data's labels "
                "have none (not a ClassLabel column): set task.class_names=[...]"
            )
        return [str(n).replace("_", " ") for n in names]

    @property
    def pool(self) -> str:
        """How the head pools the patch tokens (``model.pool``; GOAT's plain mean by default; the
        zero-shot head reads CLIP's own pooled output, the CLS token)."""
        return "cls" if self.zero_shot else self.model_cfg.get("pool") or "mean_patch"

    @property
    def head_modules(self):
        # the zero-shot head is frozen (buffers only): nothing to train or save in full
        return [] if self.zero_shot else self.model_cfg.get("head_modules") or ["classifier"]

    def datasets(self):
        s = self.settings
        d = s.dataset
        splits = s.splits
        train_name, test_name = splits.get("train", "train"), splits.get("test", "test")
        try:
            raw = v.load_vision_dataset(
                d["path"],
                d.get("name"),
                data_files=d.get("data_files"),
                image_column=d.get("image_column", "image"),
                label_column=d.get("label_column", "label"),
                data_dir=d.get("data_dir"),
                splits=[n for n in (train_name, test_name) if n is not None],
            )
        except v.DatasetLoadError as err:
            hub = d.get("hub_id")
            where = f" (task {self.name!r}; its hub dataset: {hub!r})" if hub else f" (task {self.name!r})"
            raise DataError(f"{err}{where}") from err
        for role, split in (("train", train_name), ("test", test_name)):
            if split is not None and split not in raw:  # task.splits.test=null: no test split, on purpose
                raise DataError(
                    f"task {self.name!r} needs a {role} split {split!r}; the data has {list(raw)}. Add it, "
                    f"or name another with task.splits.{role}" + ("=<split> (null: none)" if role == "test" else "")
                )
        n = s.num_labels
        classes = raw[train_name].features["label"]
        self._label_names = list(classes.names) if isinstance(classes, datasets.ClassLabel) else None
        if isinstance(classes, datasets.ClassLabel) and classes.num_classes != n:
            # a head with more outputs than classes trains dead logits; fewer cannot fit the labels
            raise DataError(
                f"task {self.name!r}: the data has {classes.num_classes} classes but task.num_labels is {n}; "
                "set task.num_labels to the number of classes (or fix the class folders / label column)"
            )
        try:
            v.check_labels(raw, n)
        except ValueError as err:
            raise DataError(
                f"task {self.name!r}: {err}. task.num_labels is {n}: fix the data (class folders / "
                "label column) or set task.num_labels"
            ) from err
        for split in {train_name, test_name} - {None}:  # the validation holdout comes from train
            try:
                checked = v.check_decodable(raw[split], split)
            except v.DatasetLoadError as err:
                raise DataError(f"task {self.name!r}: {err}") from err
            if checked:
                log.info("task %s: all %d images of split %r decode", self.name, checked, split)
        train, val = v.holdout_split(
            raw[train_name],
            fraction=s.holdout_fraction,
            max_size=s.holdout_max,
            seed=s.holdout_seed,
        )
        size = int(self.model_cfg.get("image_size", 224))
        tr, ev = v.train_transform(size), v.eval_transform(size)
        test = raw[test_name] if test_name is not None else None
        for name, ds in (("train", train), ("validation", val), ("test", test)):
            if ds is not None and len(ds) == 0:
                raise DataError(f"split {name!r} of task {self.name!r} is empty")
        return {
            "train": v.prepare_dataset(train, tr),
            "validation": v.prepare_dataset(val, ev),
            "test": v.prepare_dataset(test, ev) if test is not None else None,
        }

    def collator(self):
        return v.collate

    def compute_metrics(self, eval_pred):
        logits, labels = eval_pred
        return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}

    def metric_names(self):
        return ["accuracy"]  # compute_metrics' key

    def headline(self):
        """GOAT's vision protocol: top-1 accuracy on the test split, scored once on the final model."""
        return {"metric": "test_accuracy", "split": "test", "from": "test"}

    def protocol(self):
        # GOAT (train_vit.py) trains a fixed schedule and selects no checkpoint; the per-epoch
        # scores here come from the holdout carved out of train, the test split is scored once.
        return {
            **super().protocol(),
            "best_epoch_on": "validation (holdout of the train split)",
            "reference": "GOAT train_vit.py: a fixed schedule, no checkpoint selection; test on the final model",
            "pool": self.pool,
            "head": self.settings.head,
            **({"prompt": self.settings.prompt} if self.zero_shot else {}),
            **self._activation(),
        }

    def _activation(self) -> dict:
        """open_clip towers: the MLP activation and what decided it (OpenAI's weights need QuickGELU)."""
        if self.model_cfg.get("backend") != "open_clip":
            return {}
        from .openclip import quick_gelu

        quick, decided_by = quick_gelu(self.model_cfg)
        return {"activation": "quick_gelu" if quick else "gelu", "activation_decided_by": decided_by}
