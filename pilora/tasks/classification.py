"""Sequence classification (GLUE, the demo): one text built from a template, a linear head."""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from . import demo  # noqa: F401  (registers the demo builder)
from .base import DataError, Task, load_pretrained, load_tokenizer, register_family, require_columns, require_split
from .schema import TaskSettings, setting

METRICS = {}


def metric(name):
    def deco(fn):
        METRICS[name] = fn
        return fn

    return deco


@metric("accuracy")
def _accuracy(preds, labels):
    return float((preds == labels).mean())


@metric("mcc")
def _mcc(preds, labels):
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


@metric("f1")
def _f1(preds, labels):
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds))


# What a run selects on (its per-epoch "validation" split: the best epoch and a sweep's objective)
# and what it reports, for ``task.selection_split``. Each entry maps the raw train/validation/test
# splits (and the task) to the splits the runner uses.
SELECTION_SPLITS = {}


def selection_split(name):
    def deco(fn):
        SELECTION_SPLITS[name] = fn
        return fn

    return deco


@selection_split("validation")
def _select_on_validation(task, train, validation, test):
    """GOAT's protocol: the dev set is evaluated after every epoch, and it is also what Table 2
    reports (GLUE's test labels are hidden), so anything chosen on it is chosen on the column."""
    return {"train": train, "validation": validation, "test": test}


@selection_split("train_holdout")
def _select_on_train_holdout(task, train, validation, test):
    """For sweeps: a seeded slice of train (``task.holdout_fraction``, at most ``task.holdout_max``)
    is held out and is what the runner evaluates per epoch, picks the best epoch on and hands a
    sweeper; the dev set is scored once at the end, as the test split (``test_<metric>``)."""
    from .clip import holdout_split

    if test is not None:
        raise DataError(
            f"task {task.name!r} has a labelled test split, which task.selection_split=train_holdout "
            "would replace with the dev set; use it only for tasks whose reported split is validation"
        )
    kept, held = holdout_split(
        train,
        fraction=task.settings.holdout_fraction,
        max_size=task.settings.holdout_max,
        seed=task.settings.holdout_seed,
    )
    return {"train": kept, "validation": held, "test": validation}


def _template_fields(template: str):
    """The field names of a format string, those inside format specs (``{x:{width}}``) included;
    a malformed one (``'x {sentence'``) raises ValueError."""
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is not None:
            yield field
            yield from _template_fields(spec or "")


def check_template(template: str, columns: list) -> None:
    """``task.template`` is filled per row with ``template.format(**{column: text})``: a field that is
    not a column of ``task.text_columns`` would fail on the first batch (``{nope}``: KeyError,
    ``{0}``: IndexError), one that indexes a column (``{sentence[0]}``) would feed the model the
    wrong text, and a template with no field would give every example the same input."""
    allowed = ", ".join("{" + c + "}" for c in columns)
    fix = f"write each column of task.text_columns as {allowed}, and a literal brace as {{{{ or }}}}"
    try:
        fields = list(_template_fields(template))
    except ValueError as err:
        raise ValueError(f"task.template={template!r} is not a valid format string ({err}): {fix}") from None
    bad = [f for f in fields if f not in columns]
    if bad:
        raise ValueError(
            f"task.template={template!r} reads the field {{{bad[0]}}}, which is not one of task.text_columns "
            f"({allowed}): {fix}"
        )
    if not fields:
        raise ValueError(f"task.template={template!r} reads no column, so every example would be the same text: {fix}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassificationSettings(TaskSettings):
    """``task.*`` of a sequence-classification task (GLUE, the demo)."""

    text_columns: list = setting(help="the columns the template reads, e.g. [sentence1, sentence2]")
    template: str = setting(
        help="the model's input: template.format(**row), e.g. GOAT's RTE 'determine if the second sentence "
        "entails the first sentence: {sentence1}\\n{sentence2}\\nresult: '"
    )
    label_column: str = setting("label", help="the column of integer class ids 0..num_labels-1")
    num_labels: int = setting(2, low=1, help="classes of the head")
    max_length: int = setting(128, low=1, help="tokens; longer inputs are truncated")
    metrics: list = setting(factory=lambda: ["accuracy"], help="what each evaluation reports (METRICS)")
    selection_split: str = setting(
        "validation", help="what the per-epoch evaluation scores: validation | train_holdout (SELECTION_SPLITS)"
    )
    holdout_fraction: float = setting(0.1, low=0, help="train_holdout only: seeded share of train held out")
    holdout_max: int = setting(2000, low=1, help="train_holdout only: cap on the holdout (examples)")
    holdout_seed: int = setting(0, low=0, help="train_holdout only: seed of the holdout (not the run's seed)")


@register_family("classification")
class ClassificationTask(Task):
    """``template.format(**row)`` -> tokenizer (max_length) -> ``AutoModelForSequenceClassification``."""

    model_families = ("encoder",)
    example_model = "roberta-large"
    task_type = "SEQ_CLS"
    settings_cls = ClassificationSettings
    metric_hint = f" (task.metrics lists what each evaluation reports, from {', '.join(sorted(METRICS))})"

    def __init__(self, task_cfg, model_cfg, seed=0):
        super().__init__(task_cfg, model_cfg, seed)
        self.check_config(task_cfg)  # config only (no files): a task built from Python is checked too
        self.tokenizer = load_tokenizer(model_cfg)

    @classmethod
    def check_config(cls, task_cfg: dict) -> None:
        """``task.metrics`` (names of :data:`METRICS`) and ``task.template`` (fields of
        ``task.text_columns``), then the shared checks (``task.metric`` among ``task.metrics``)."""
        s = cls.probe(task_cfg).settings
        unknown = [m for m in s.metrics if m not in METRICS]
        if unknown:
            raise ValueError(
                f"task.metrics={list(s.metrics)} names unknown metric(s) {unknown}; "
                f"choose from {', '.join(sorted(METRICS))}"
            )
        check_template(s.template, list(s.text_columns))
        super().check_config(task_cfg)

    def metric_names(self) -> list[str]:
        return list(self.settings.metrics)

    @property
    def head_modules(self):
        return self.model_cfg.get("head_modules") or ["classifier"]

    def build_model(self):
        from transformers import AutoModelForSequenceClassification

        return load_pretrained(self.model_cfg, AutoModelForSequenceClassification, num_labels=self.settings.num_labels)

    def required_columns(self):
        return (
            list(self.settings.text_columns) + [self.settings.label_column],
            "task.text_columns / task.label_column to the file's names",
        )

    @property
    def selection(self) -> str:
        name = self.settings.selection_split or "validation"
        if name not in SELECTION_SPLITS:
            raise ValueError(
                f"task.selection_split={name!r} is not a selection split; choose one of {sorted(SELECTION_SPLITS)}"
            )
        return name

    def datasets(self):
        select = SELECTION_SPLITS[self.selection]  # a bad name fails before loading any data
        raw = self.load_raw()
        s = self.settings
        splits = s.splits
        names = {k: splits.get(k, k) for k in ("train", "validation", "test")}  # the data's split names
        out = {k: require_split(raw, names[k], self.name, required=(k != "test")) for k in names}
        template, label = s.template, s.label_column
        columns = list(s.text_columns) + [label]
        n = s.num_labels
        hint = (
            "GLUE columns are listed in conf/task/glue/*.yaml (task.text_columns, task.label_column); "
            "local files must use the same column names"
        )

        def encode(batch):
            texts = [template.format(**{c: batch[c][i] for c in s.text_columns}) for i in range(len(batch[label]))]
            enc = self.tokenizer(texts, truncation=True, max_length=s.max_length)
            enc["labels"] = batch[label]
            return enc

        for split, ds in out.items():
            if ds is None:
                continue
            file = self.data_file(names[split])  # leads the messages below: the file to fix
            require_columns(ds, columns, self.name, hint)
            for col in columns:
                blank = [i for i, x in enumerate(ds[col]) if x is None]
                if blank:
                    raise DataError(
                        f"{file}split {split!r} of task {self.name!r} has {len(blank)} row(s) with no "
                        f"{col!r} value (first: row {blank[0]}); the file may be truncated or have "
                        "blank cells"
                    )
            labels = np.asarray(ds[label])
            if labels.dtype.kind not in "iub":
                example = next((x for x in ds[label] if not isinstance(x, (int, np.integer))), labels[0])
                raise DataError(
                    f"{file}column {label!r} of split {split!r} of task {self.name!r} holds "
                    f"{type(example).__name__} labels (e.g. {example!r}), not class ids; write the "
                    f"labels as integers 0..{n - 1} (task.label_column names the column)"
                )
            if split != "test" and ((labels < 0) | (labels >= n)).any():  # GLUE test labels are -1
                bad = labels[(labels < 0) | (labels >= n)][0]
                raise DataError(
                    f"{file}label {bad} in split {split!r} of task {self.name!r} is outside "
                    f"[0, {n}); fix the data or task.num_labels"
                )
            out[split] = ds.map(
                encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {self.name}/{split}"
            )
        if out["test"] is not None and min(out["test"]["labels"]) < 0:
            out["test"] = None  # unlabelled test split (GLUE): evaluate on validation only
        return select(self, out["train"], out["validation"], out["test"])

    def collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def compute_metrics(self, eval_pred):
        logits, labels = eval_pred
        preds = np.asarray(logits).argmax(-1)
        return {m: METRICS[m](preds, np.asarray(labels)) for m in self.settings.metrics}

    def headline(self):
        """GLUE (GOAT's protocol): the dev set's ``eval_<metric>`` at the best (or final) epoch. With
        ``selection_split=train_holdout`` the dev set is scored once at the end: ``test_<metric>``."""
        if self.selection == "train_holdout":
            return {
                "metric": f"test_{self.metric}",
                "split": "validation (scored once as the test split)",
                "from": "test",
            }
        return {"metric": f"eval_{self.metric}", "split": "validation", "from": "epoch"}

    def protocol(self):
        out = super().protocol()
        out["selection_split"] = self.selection
        if self.selection == "train_holdout":
            out["reported_split"] = "validation, scored once as the test split (test_<metric>)"
            out["best_epoch_on"] = "a seeded holdout of the train split (task.selection_split=train_holdout)"
        elif out["reported_split"] == "validation":
            # GOAT (train_nlu.py) evaluates the dev set after every epoch and trains a fixed schedule;
            # GLUE's test labels are hidden, so the "best epoch" is picked on the very data it reports.
            out["best_epoch_on"] = "validation (the reported split: the best epoch is an optimistic choice)"
        else:
            out["best_epoch_on"] = "validation"
        out["reference"] = "GOAT train_nlu.py: a fixed schedule, the dev set evaluated after every epoch"
        return out
