"""The task interface, the family registry, and dataset loading shared by every family."""

from __future__ import annotations

import glob
import os
from typing import Any, Callable

import datasets
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from .schema import TaskSettings

FAMILIES: dict[str, type["Task"]] = {}
# datasets the project generates itself (task.dataset.path: <key>), e.g. the offline demo
BUILDERS: dict[str, Callable[..., datasets.DatasetDict]] = {}


class DataError(ValueError):
    """Bad or missing data: the message names the path/hub id and what to change."""


def register_family(name: str):
    def deco(cls):
        cls.family = name
        FAMILIES[name] = cls
        return cls

    return deco


def make_task(task_cfg: dict, model_cfg: dict, seed: int = 0) -> "Task":
    family = task_cfg.get("family")
    if family not in FAMILIES:
        raise ValueError(
            f"task {task_cfg.get('name')!r} has unknown family {family!r}; known families: {sorted(FAMILIES)}"
        )
    cls = FAMILIES[family]
    if model_cfg.get("family") not in cls.model_families:
        raise ValueError(
            f"model {model_cfg.get('name')!r} ({model_cfg.get('family')}) cannot do task "
            f"{task_cfg.get('name')!r} ({family}); this task needs a model of family "
            f"{list(cls.model_families)}, e.g. model={cls.example_model}"
        )
    return cls(task_cfg, model_cfg, seed)


class Task:
    """One task: data, model, metrics. Subclasses fill in the family-specific parts."""

    family: str = ""
    model_families: tuple[str, ...] = ()
    example_model: str = ""
    task_type: str | None = None  # PEFT task type
    remove_unused_columns: bool = True  # Trainer flag (False when a transform needs raw columns)
    # Whether the model's loss is normalised by Trainer's ``num_items_in_batch`` (HF causal LMs).
    # Trainer guesses True for any ``forward(**kwargs)``, then skips the 1/gradient_accumulation
    # scaling and multiplies by the DDP world size; for a plain per-batch mean loss (sequence
    # classification, the CLIP classifier) that inflates the gradients. None keeps Trainer's guess.
    accepts_loss_kwargs: bool | None = False
    # task.* keys that change only the final evaluation (not the trained weights): a job differing
    # from a finished one only in them reuses its adapter and reruns the evaluation
    evaluation_keys: tuple[str, ...] = ()
    # where final_metrics writes per-example predictions (<dir>/<set>.jsonl); None: not written
    predictions_dir: str | None = None
    # the family's task.* keys: types, defaults and help, declared once (pilora.tasks.schema)
    settings_cls: type[TaskSettings] = TaskSettings

    def __init__(self, task_cfg: dict, model_cfg: dict, seed: int = 0):
        self.settings = self.settings_cls.from_dict(task_cfg)
        # every key, set or defaulted, as a plain dict (for code that reads the section by name)
        self.cfg = self.settings.as_dict()
        self.model_cfg, self.seed = model_cfg, seed
        self.name = self.settings.name

    @classmethod
    def probe(cls, task_cfg: dict) -> "Task":
        """A task holding only its settings (no tokenizer, no data): for what reads the config alone."""
        task = cls.__new__(cls)
        task.settings = cls.settings_cls.from_dict(task_cfg)
        task.cfg, task.name, task.model_cfg, task.seed = task.settings.as_dict(), task.settings.name, {}, 0
        return task

    # --- to be provided by families ---------------------------------------------------------
    @classmethod
    def check_config(cls, task_cfg: dict) -> None:
        """Raise a ValueError (or :class:`DataError`) naming the key for a setting of ``task_cfg``
        that could not run; called before the job's folder is made, so that an evaluation setting
        fails before training rather than after it. Nothing is loaded but small files. Here: the
        keys and types of the family's schema, that the family names its headline metric, and
        that ``task.metric`` is one the family computes."""
        probe = cls.probe(task_cfg)
        probe.headline()
        probe.check_metric()

    def metric_names(self) -> list[str]:
        """The keys of :meth:`compute_metrics` (each evaluation logs them as ``eval_<key>``)."""
        return []

    def check_metric(self) -> None:
        """``task.metric`` is one that every evaluation reports: the Trainer's ``loss`` or a key of
        :meth:`compute_metrics`. Any other name is in no evaluation: the best epoch would silently
        be the last one and a sweep's objective NaN."""
        known = ["loss", *self.metric_names()]
        if self.metric not in known:
            raise ValueError(
                f"task.metric={self.metric!r} is not a metric task {self.name!r} computes per epoch; "
                f"set task.metric to one of {', '.join(known)}{self.metric_hint}"
            )

    # appended to check_metric's message: where a family's metrics are chosen (e.g. task.metrics)
    metric_hint: str = ""

    def headline(self) -> dict:
        """The one number a table reports for this task, as the record names it
        (``results.json["evaluation"]["headline"]``): ``{"metric": key, "split": what it scores,
        "from": "test" | "epoch"}``. ``from: test``: ``metric`` is a key of ``metrics.test``;
        ``from: epoch``: of the per-epoch evaluations (``metrics.best`` / ``metrics.final``)."""
        raise NotImplementedError(
            f"task family {self.family!r} ({type(self).__name__}) names no headline metric: define "
            "headline() so that records say which number the tables report"
        )

    def build_model(self):
        """A fresh pretrained model with the task head (deterministic for ``self.seed``)."""
        raise NotImplementedError

    def datasets(self) -> dict[str, Any]:
        """``{"train": ..., "validation": ..., "test": ... or None}`` ready for Trainer."""
        raise NotImplementedError

    def evaluation_datasets(self) -> dict[str, Any]:
        """What scoring a trained model alone needs (``python -m pilora.runner.evaluate``): by
        default :meth:`datasets`, whose ``test`` split :meth:`final_metrics` predicts."""
        return self.datasets()

    def collator(self) -> Callable | None:
        return None

    def compute_metrics(self, eval_pred) -> dict:
        return {}

    def final_metrics(self, model, trainer, data: dict) -> dict:
        """Metrics computed once after training: by default the labelled test split, if any."""
        test = data.get("test")
        if test is None:
            return {}
        limit = self.settings.test_limit  # a smoke run's first examples only (pilora.runner.smoke)
        if limit:
            test = test.select(range(min(limit, len(test))))
        out = trainer.predict(test, metric_key_prefix="test")
        return {
            k: v for k, v in out.metrics.items() if not k.endswith(("_runtime", "_per_second", "_preparation_time"))
        }

    def input_paths(self) -> dict[str, str]:
        """``{config key: path}`` of the local files the job will read (checked before training)."""
        return {}

    def protocol(self) -> dict:
        """How this task's numbers are produced, for the record (``results.json["evaluation"]``):
        which split is reported, what picks the model, the reference it follows, and the headline
        metric (:meth:`headline`)."""
        return {
            "reported_split": "test" if self.settings.splits.get("test") else "validation",
            "headline": self.headline(),
        }

    @property
    def head_modules(self) -> list[str] | None:
        return self.model_cfg.get("head_modules")

    @property
    def metric(self) -> str:
        return self.settings.metric

    # --- shared data loading -------------------------------------------------------------------
    def load_raw(self) -> datasets.DatasetDict:
        """``datasets.load_dataset(path, name, data_files=...)`` with errors that say what to do."""
        return load_raw(self.settings.dataset, self.name, self.required_columns())

    def required_columns(self) -> tuple[list[str], str] | None:
        """Columns every local data file must have, and which keys name them (None: no check)."""
        return None

    def data_file(self, split: str) -> str:
        """``data file '<file>': `` of a split read from ``task.dataset.data_files.<split>``, to lead
        a message about the split's contents; '' for a split the data files do not name."""
        files = self.settings.dataset.get("data_files")
        files = files.get(split) if isinstance(files, dict) else None
        return f"data file {files!r}: " if files else ""


def _local_files(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        out = []
        for v in data_files.values():
            out += _local_files(v)
        return out
    return [str(f) for f in data_files]


def _check_table_file(f: str, task_name: str, columns: tuple[list[str], str] | None) -> None:
    """A local CSV/TSV file has a header with the task's columns and at least one row."""
    import csv

    delimiter = "\t" if f.endswith(".tsv") else ","
    try:
        with open(f, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            first = next((row for row in reader if row), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return  # unreadable here: load_dataset reports it with the file's name
    if header is None:
        return
    header = [h.strip() for h in header]
    if columns:
        needed, keys = columns
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(
                f"data file {f!r} of task {task_name!r}: the task needs columns {missing} but the "
                f"file has {header}; rename the file's columns, or set {keys}"
            )
    if first is None:
        raise DataError(
            f"data file {f!r} of task {task_name!r} is empty: it has a header ({', '.join(header)}) but no rows; "
            "regenerate it or point task.dataset.data_files at a file with data"
        )


# datasets' own loaders (csv, json, parquet, imagefolder, ...): such a path names no hub dataset
_PACKAGED = frozenset(_PACKAGED_DATASETS_MODULES)


def load_raw(ds_cfg: dict, task_name: str = "", columns: tuple[list[str], str] | None = None) -> datasets.DatasetDict:
    """``columns``: (the columns every local CSV/TSV file must have, the config keys that name them)."""
    path, name = ds_cfg.get("path"), ds_cfg.get("name")
    if path in BUILDERS:
        return BUILDERS[path](**(ds_cfg.get("builder_args") or {}))
    data_files = ds_cfg.get("data_files")
    hub_id = ds_cfg.get("hub_id") or path
    hub_hint = f"the hub dataset {hub_id!r}"
    for f in _local_files(data_files):
        matches = glob.glob(os.path.expanduser(f))
        if not matches:
            raise DataError(
                f"data file {f!r} for task {task_name!r} does not exist; fix "
                f"task.dataset.data_files, or load {hub_hint} with task.dataset.path={hub_id}"
            )
        for match in matches:
            if os.path.isfile(match) and os.path.getsize(match) == 0:
                raise DataError(
                    f"data file {match!r} of task {task_name!r} is empty (0 bytes); regenerate or re-download it"
                )
            if os.path.isfile(match) and (path in ("csv", "tsv") or match.endswith((".csv", ".tsv"))):
                _check_table_file(match, task_name, columns)
    if path and path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise DataError(
            f"dataset path {path!r} for task {task_name!r} does not exist; "
            f"pre-download {hub_hint} there, or set task.dataset.path={hub_id}"
        )
    try:
        if isinstance(data_files, dict):
            # one load per split: in one load the first file's column types bind every split (a
            # validation file of string labels then failed as "cannot parse 'positive' as int64",
            # or a .tsv train file as a column-mismatch of validation.csv); loaded alone, each file
            # gets the family's own checks, which name it
            raw = datasets.DatasetDict(
                {s: _load_files(path, name, f, ds_cfg, task_name, s) for s, f in data_files.items() if f}
            )
        else:
            raw = _load_files(path, name, data_files, ds_cfg, task_name)
    except (ConnectionError, OSError) as err:
        # a path that is neither a local folder nor a datasets builder went to the hub: name it first
        what = (
            hub_hint
            if path == hub_id or path in _PACKAGED
            else f"task.dataset.path={path!r} (no such folder; {hub_hint})"
        )
        raise DataError(
            f"could not load {what} for task {task_name!r} ({type(err).__name__}: {err}). "
            "Without network access, pre-download it and point task.dataset.path (and "
            "task.dataset.data_files) at the local copy."
        ) from err
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    return raw


def _load_files(path, name, data_files, ds_cfg: dict, task_name: str, split: str | None = None):
    """``datasets.load_dataset`` of ``data_files`` (as ``split``, when given); a file it cannot
    parse is a :class:`DataError` naming it. A .tsv file is read with tabs (the csv builder's
    default is commas, which makes a tab-separated file one column)."""
    kwargs = {"data_files": {split: data_files} if split else data_files, "split": split}
    if ds_cfg.get("data_dir"):
        kwargs["data_dir"] = ds_cfg["data_dir"]
    files = _local_files(data_files)
    if path == "csv" and files and all(f.endswith(".tsv") for f in files):
        kwargs["delimiter"] = "\t"
    try:
        return datasets.load_dataset(path, name, **{k: v for k, v in kwargs.items() if v is not None})
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        culprit = _unreadable_file(path, name, data_files)
        where = f"data file {culprit!r}" if culprit else f"the data files ({data_files})"
        raise DataError(
            f"could not read {where} of task {task_name!r}: {cause}. Empty, truncated or "
            "malformed files must be fixed or regenerated."
        ) from err


def _unreadable_file(path, name, data_files) -> str | None:
    """On a load error: the first local data file that fails to load on its own (error path only)."""
    files = [m for f in _local_files(data_files) for m in sorted(glob.glob(os.path.expanduser(f)))]
    if len(files) < 2:
        return files[0] if files else None
    for f in files:
        try:
            datasets.load_dataset(path, name, data_files={"probe": f}, split="probe")
        except Exception:  # noqa: BLE001 - any failure marks the culprit
            return f
    return None


def require_split(raw: datasets.DatasetDict, split: str | None, task_name: str, *, required=True):
    if split is None:
        return None
    if split not in raw:
        if not required:
            return None
        raise DataError(
            f"task {task_name!r} needs split {split!r} but the data has {list(raw)}; "
            f"set task.splits.* or task.dataset.data_files.{split}"
        )
    ds = raw[split]
    if len(ds) == 0:
        raise DataError(f"split {split!r} of task {task_name!r} is empty; check the data files")
    return ds


def require_columns(ds, columns: list[str], task_name: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"task {task_name!r} needs columns {missing} but the data has {ds.column_names}"
            + (f"; {hint}" if hint else "")
        )


def load_pretrained(model_cfg: dict, auto_cls, **kwargs):
    """``auto_cls.from_pretrained(model.path)``, or a randomly initialised model built from
    ``model.from_config`` (the tiny test variants: no weights, no download)."""
    import torch
    from transformers import AutoConfig

    from .gguf import resolve

    model_cfg = resolve(model_cfg)  # model.gguf: the package's GGUF file, converted once
    dtype = getattr(torch, model_dtype(model_cfg))
    if model_cfg.get("from_config"):
        spec = dict(model_cfg["from_config"])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec, **kwargs)
        return auto_cls.from_config(config, dtype=dtype)
    path = model_cfg["path"]
    check_model_path(model_cfg)
    try:
        return auto_cls.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {path!r} ({err}); without network access, "
            "pre-download it and set model.path to the local directory"
        ) from err


# model.dtype: the precision the base model's weights load in (null: float32)
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def model_dtype(model_cfg: dict) -> str:
    """``model.dtype`` (null: float32), a name of :data:`MODEL_DTYPES` (a ValueError listing them)."""
    name = model_cfg.get("dtype") or "float32"
    if name not in MODEL_DTYPES:
        raise ValueError(
            f"model.dtype={name!r} is not a weight dtype: set model.dtype to one of {', '.join(MODEL_DTYPES)}"
        )
    return name


def check_model_dtype(model_cfg: dict, trainer_cfg: dict, on_this_machine: bool = True) -> None:
    """``model.dtype`` names a dtype, and float16 weights train on an accelerator: on a CPU a float16
    base trains to NaN within a few steps (float16's range is too narrow for its activations and
    gradients without a GPU's mixed-precision loss scaling), which a lower learning rate does not cure.
    ``on_this_machine=False`` (the job runs elsewhere): only ``trainer.use_cpu`` says it runs on a CPU."""
    import torch

    on_cpu = trainer_cfg.get("use_cpu") or (on_this_machine and not torch.accelerator.is_available())
    if model_dtype(model_cfg) == "float16" and on_cpu:
        where = "trainer.use_cpu=true" if trainer_cfg.get("use_cpu") else "this machine has no GPU"
        raise ValueError(
            f"model.dtype=float16 cannot train on a CPU ({where}): float16 weights train to NaN there. "
            "Set model.dtype=float32 (or model.dtype=bfloat16), or run on a GPU"
        )


def check_model_path(model_cfg: dict, key: str = "path") -> None:
    """A local-looking ``model.<key>`` (absolute, ``./``, ``~``) that does not exist is an error
    naming it, instead of a hub look-up error about repo-id syntax."""
    path = model_cfg.get(key)
    if not path:
        raise ValueError(
            f"model.{key} is not set for model {model_cfg.get('name')!r}; set it to a local "
            "checkpoint directory or a hub id"
        )
    local = os.path.expanduser(str(path))
    if str(path).startswith((".", "/", "~")) and not os.path.exists(local):
        hub = model_cfg.get("hub_id")
        raise FileNotFoundError(
            f"model.{key} {path!r} does not exist; set it to a local checkpoint "
            "directory" + (f" or the hub id {hub!r}" if hub else " or a hub id")
        )
    if os.path.isdir(local):
        wanted = ("config.json",) if key == "path" else _TOKENIZER_FILES
        names = sorted(os.listdir(local))
        if not any(n in names for n in wanted):
            what = (
                "model checkpoint (no config.json)"
                if key == "path"
                else f"tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
            )
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "nothing"
            raise FileNotFoundError(
                f"model.{key} {path!r} is not a {what}: the folder holds {shown}. Set "
                f"model.{key} to a folder written by save_pretrained (or a hub id)"
            )


# files one of which a tokenizer folder holds (fast, slow WordPiece/BPE, SentencePiece)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "config.json",
)


def load_tokenizer(model_cfg: dict):
    from transformers import AutoTokenizer

    from .gguf import resolve

    model_cfg = resolve(model_cfg)
    key = "tokenizer" if model_cfg.get("tokenizer") else "path"
    check_model_path(model_cfg, key)
    path = model_cfg[key]
    try:
        tok = AutoTokenizer.from_pretrained(path, **(model_cfg.get("tokenizer_kwargs") or {}))
    except OSError as err:
        raise FileNotFoundError(
            f"could not load the tokenizer {path!r} ({err}); set model.tokenizer or model.path to a local directory"
        ) from err
    return tok
