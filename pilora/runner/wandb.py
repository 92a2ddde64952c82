"""One W&B run per job, mirroring its ``results.json`` (``logger=wandb``; ``logger=none`` turns it off).

* **Name, group, tags:** ``<method>-<task>-<model>-s<seed>`` (method = ``method.label`` when set,
  e.g. ``lora_matched``) plus the job's sweep point: the swept overrides other than those four
  (``-supplementary_r=2``; a 6-character hash of them when longer than
  :data:`MAX_POINT`), so every point of a sweep is a run, and an artifact, of its own name
  (:func:`sweep_point`). Grouped by ``logger.group``, else the sweep name (``sweep_name``, set by
  every ``experiment=``, or any multirun), else, for a lone job, its name without the seed, so
  the seeds of one setting share a group. Tagged ``method:<m>``, ``task:<t>``, ``model:<x>``,
  ``stages:<1+2|2>`` and one ``<key>=<value>`` per swept override; ``job_type`` is
  ``two_stage`` (PiLoRA, budget-matched LoRA) or ``single_stage``.
* **Config:** the resolved Hydra config and nothing else. Trainer's own W&B callback is not used
  (it would add ~150 TrainingArguments keys at the top level, and stage 2 would overwrite
  stage 1's); :class:`StageLogger` logs the Trainer's metrics instead.
* **Metrics:** under the name of the Trainer's output folder: ``stage1/<key>`` for the
  importance pass, ``stage2/<key>`` for PiLoRA's second stage and ``train/<key>`` for the one
  training of every other method (budget-matched LoRA included: its training is no PiLoRA
  stage 2), each against its own step axis (``stage1/step``, ``stage2/step``, ``train/step``).
* **Summary:** everything ``results.json`` holds except the config (the run's config) and the
  per-step loss list (the ``stage2/loss`` or ``train/loss`` history), plus ``label`` and ``T`` (importance checks).
* **Artifacts** (``logger.artifacts``, default on): ``<run>-record`` (type ``results``:
  ``results.json`` and, for two-stage methods, ``importance.pt``) and ``<run>-adapter`` (type
  ``model``: the stock-PEFT ``adapter/`` and PiLoRA's compact ``adapter_pilora/``, with metadata
  naming the base model, the method, r, r' and the target modules), each file skipped with a log
  line when larger than ``logger.artifact_max_mb``.
* **Self-contained run folder:** the record artifact's files (``results.json``, ``importance.pt``,
  a generation task's ``predictions/<set>.jsonl``) are also copied into the run's ``files/`` (W&B
  keeps offline artifact files in its staging folder, outside the run folder), so a ``wandb/``
  folder copied to another machine still gives the tables and figures
  (``analysis.records.load_wandb_dir``); the installed packages are saved there too
  (``requirements.txt``), quiet or not.
* **One run per job, across reruns:** the run's id is kept in ``<output_dir>/wandb/run_id``; a
  rerun (an interrupted job resuming, a finished one scoring new test sets) resumes that run
  (``resume="allow"``; offline: a new ``offline-run-*`` folder with the same id), and
  ``resume=false`` starts a new one. The run folders live in the job's folder
  (``dir=<output_dir>``, whatever ``WANDB_DIR`` says), where the analysis finds them.
* **Off:** ``logger=none``, or ``WANDB_MODE=disabled`` / ``logger.mode=disabled``.
* **No network:** with ``logger.mode=online``, a W&B server that cannot be reached (a TCP probe,
  at most 10 s) or a ``wandb.init`` that fails (``logger.init_timeout_s``, no API key) makes the
  run offline, with a warning and ``offline_fallback`` in the record's ``wandb`` entry; the
  job continues, and ``wandb sync`` uploads the run later.
* **Quiet:** W&B's console output (banners, sync hints, captured stdout) is off unless
  ``logger.verbose=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

from ..io import atomic_write

log = logging.getLogger("pilora")
_RUN = None  # the job's run while it trains; StageLogger callbacks log into it
_NAME: str | None = None  # its name (the artifacts' names start with it)
FALLBACK: str | None = None  # why the job's online run went offline (None: it did not)


def _safe(text, keep: str = "") -> str:
    """W&B artifact names: letters, digits, ``-_.`` (and ``keep``) only (task names may hold a ``/``)."""
    return re.sub(rf"[^A-Za-z0-9_.{re.escape(keep)}-]+", "_", str(text))


LOGGERS = ("wandb", "none")  # logger.name (conf/logger/): start_run logs a run for wandb, nothing for none
# logger.mode: what start_run handles (online: a reachability probe and an offline fallback;
# disabled: no run). wandb.init also takes shared / dryrun / run, which would bypass both.
MODES = ("online", "offline", "disabled")
NAME_KEYS = ("method", "task", "model", "seed")  # overrides the run name already spells out
MAX_POINT = 40  # characters of swept overrides spelled out in a run name; longer ones are hashed
MAX_TAG = 64  # W&B's limit on a tag


def _base_name(cfg: dict) -> str:
    method = cfg["method"].get("label") or cfg["method"]["name"]
    return f"{method}-{cfg['task']['name']}-{cfg['model']['name']}"


def _hydra_overrides(cfg: dict) -> dict[str, str] | None:
    """``{key: value}`` of the job's swept overrides when Hydra launched it (None otherwise).

    Swept: the keys of ``hydra.sweeper.params`` (experiment overlays, Optuna) and the command-line
    overrides that the sweep expanded (``method.supplementary_r=1,2``), read from the sweep's
    ``multirun.yaml`` (Hydra's basic sweeper writes it). A lone job (or a sweeper that writes no
    ``multirun.yaml`` and has no params) counts all its overrides, less Hydra's
    ``override_dirname.exclude_keys``. ``method.<key>`` overrides the job's method does not use are
    dropped, as in its folder name (``hydra_setup.job_dirname``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        from .summary import swept_keys

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    parser = OverridesParser.create()
    job = {o.key_or_group: o.get_value_element_as_str() for o in parser.parse_overrides(list(hc.overrides.task))}
    swept = None
    if hc.mode == RunMode.MULTIRUN:
        params = OmegaConf.select(hc, "sweeper.params") or {}
        saved = os.path.join(str(hc.sweep.dir), "multirun.yaml")
        line = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task") if os.path.isfile(saved) else None
        swept = set(swept_keys(line or [], params)) if line is not None or params else None
    if swept is None:
        swept = set(job) - set(hc.job.config.override_dirname.exclude_keys or ())
    from ..methods import METHODS, applicable_keys

    name = cfg["method"]["name"]
    used = set(applicable_keys(name, bool(cfg["method"].get("match_budget")))) if name in METHODS else None

    def wanted(key: str) -> bool:
        parts = key.replace("/", ".").split(".")
        return not (used is not None and parts[0] == "method" and len(parts) > 1 and parts[1] not in used)

    return {k: job[k] for k in sorted(swept) if k in job and wanted(k)}


def sweep_point(cfg: dict, out: str) -> dict[str, str]:
    """The overrides that set this job apart from the other points of its sweep, as ``{key: value}``
    (the keys of :data:`NAME_KEYS` left out: the run name spells them out).

    Under Hydra: the swept overrides (:func:`_hydra_overrides`). A job started from Python (tests,
    notebooks) has only its folder: when that is named by overrides other than :data:`NAME_KEYS`
    (``method=pilora,method.supplementary_r=2``), the point is ``{"job": <a 6-character hash of
    the folder name>}``, so two such jobs never share a run name."""
    found = _hydra_overrides(cfg)
    if found is None:
        folder = os.path.basename(os.path.normpath(out))
        pairs = [p.partition("=") for p in folder.split(",")]
        if all(eq and key in NAME_KEYS for key, eq, _ in pairs):
            return {}
        return {"job": hashlib.sha1(folder.encode()).hexdigest()[:6]}
    return {k: v for k, v in found.items() if k.lstrip("+~") not in NAME_KEYS}


def _point_text(point: dict[str, str]) -> str:
    """``supplementary_r=2`` / ``r=8-supplementary_r=2``: the last part of each key, unless two keys
    share it; a 6-character hash of the whole when longer than :data:`MAX_POINT`."""
    if not point:
        return ""
    if set(point) == {"job"}:
        return point["job"]
    leaves = [k.replace("/", ".").split(".")[-1].lstrip("+~") for k in point]
    keys = leaves if len(set(leaves)) == len(leaves) else [k.lstrip("+~") for k in point]
    text = "-".join(f"{k}={v}" for k, v in zip(keys, point.values()))
    if len(text) > MAX_POINT:
        text = hashlib.sha1(",".join(f"{k}={v}" for k, v in point.items()).encode()).hexdigest()[:6]
    return text


def run_name(cfg: dict, point: dict[str, str] | None = None) -> str:
    """``<method>-<task>-<model>-s<seed>`` plus the sweep point (:func:`sweep_point`)."""
    text = _point_text(point or {})
    return _safe(f"{_base_name(cfg)}-s{cfg['seed']}" + (f"-{text}" if text else ""), keep="=")


def artifact_name(name: str) -> str:
    """W&B artifact names: letters, digits, ``-_.`` only."""
    return _safe(name)


def run_group(cfg: dict, point: dict[str, str]) -> str:
    """``logger.group``; else the sweep's name in a sweep; else the run name without its seed."""
    lg = cfg.get("logger") or {}
    if lg.get("group"):
        return str(lg["group"])
    sweep = cfg.get("sweep_name")
    if sweep and (sweep != "default" or _in_multirun()):
        return str(sweep)
    text = _point_text(point)
    return _safe(_base_name(cfg) + (f"-{text}" if text else ""), keep="=")


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def _tag(text: str) -> str:
    return str(text).replace(",", "_")[:MAX_TAG]


def two_stage(cfg: dict) -> bool:
    from ..methods import METHODS

    return METHODS[cfg["method"]["name"]].runs_stage1(cfg["method"])


def start_run(cfg: dict, out: str):
    """Open the job's W&B run (or return None when ``logger.name`` is not ``wandb``)."""
    global _RUN
    lg = cfg.get("logger") or {}
    if lg.get("name") != "wandb":
        return None
    import wandb

    global _NAME
    method = cfg["method"].get("label") or cfg["method"]["name"]
    stages = "1+2" if two_stage(cfg) else "2"
    point = sweep_point(cfg, out)
    tags = [f"method:{method}", f"task:{cfg['task']['name']}", f"model:{cfg['model']['name']}", f"stages:{stages}"]
    tags += [f"{k.lstrip('+~')}={v}" for k, v in point.items()]
    verbose = bool(lg.get("verbose", False))
    timeout = float(lg.get("init_timeout_s") or 60)
    # the package list is part of a run's provenance: saved whether W&B talks or not
    settings = dict(
        silent=not verbose, quiet=not verbose, console="auto" if verbose else "off", x_save_requirements=True
    )
    _NAME = lg.get("run_name") or run_name(cfg, point)
    kwargs = dict(
        project=lg.get("project", "pilora"),
        entity=lg.get("entity"),
        dir=out,
        name=_NAME,
        group=run_group(cfg, point),
        tags=list(dict.fromkeys(_tag(t) for t in [*tags, *(lg.get("tags") or [])])),
        job_type="two_stage" if stages == "1+2" else "single_stage",
        config=cfg,
        reinit="finish_previous",
    )
    mode = lg.get("mode", "offline")
    if mode == "disabled":  # WANDB_MODE=disabled: W&B's dummy run has no folder to keep files in
        log.info("W&B: logger.mode=disabled; this job logs no run (as logger=none)")
        _NAME = None
        return None
    saved = saved_run_id(out) if cfg.get("resume", True) else None
    if saved:  # a rerun of an interrupted (or re-evaluated) job continues its run: one run per job
        kwargs.update(id=saved, resume="allow")
    global FALLBACK
    FALLBACK = None
    if mode == "online":
        FALLBACK = unreachable(min(timeout, 10.0))
    if mode == "online" and FALLBACK is None:
        runs_dir = os.path.join(out, "wandb")
        before = set(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else set()
        try:
            run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout, **settings), **kwargs)
        except (wandb.errors.Error, TimeoutError, OSError) as err:  # no network, no API key, server down
            FALLBACK = f"wandb.init failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            for name in (set(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else set()) - before:
                if name.startswith("run-"):  # the failed attempt's empty run folder: no run to read or sync
                    shutil.rmtree(os.path.join(runs_dir, name), ignore_errors=True)
    if FALLBACK is not None:
        mode = "offline"
        log.warning(
            "W&B: logger.mode=online but %s; logging this run offline instead (nothing is lost: "
            "upload it later with `wandb sync %s`)",
            FALLBACK,
            os.path.join(out, "wandb", "offline-run-*"),
        )
    if mode != "online" or FALLBACK is not None:
        run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    for stage in STAGES:
        run.define_metric(f"{stage}/step")
        run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    if run.id != saved:
        atomic_write(os.path.join(out, "wandb", RUN_ID_FILE), lambda f: f.write(run.id + "\n"))
    _RUN = run
    return run


RUN_ID_FILE = "run_id"  # <output_dir>/wandb/run_id: the job's W&B run, which a rerun resumes


def saved_run_id(out: str) -> str | None:
    """The W&B run id an earlier attempt of the job in ``out`` opened (None: no attempt logged one)."""
    path = os.path.join(out, "wandb", RUN_ID_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else None


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def unreachable(timeout: float) -> str | None:
    """Why the W&B server cannot be reached (a TCP connection to its host within ``timeout`` s), or
    None when it answers or a proxy is configured (then ``wandb.init`` and its timeout decide)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(base_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"the W&B server {base_url()} cannot be reached ({type(err).__name__}: {err})"


def record_entry(run) -> dict:
    """What the record says about the job's run; ``offline_fallback`` says why an online run went offline."""
    out = {"id": run.id, "name": run.name, "group": run.group, "project": run.project, "dir": run.dir}
    if FALLBACK is not None:
        out.update(mode="offline", offline_fallback=FALLBACK)
    return out


STAGES = ("stage1", "stage2", "train")  # the Trainer output folders of pilora.runner.train


def stage_of(output_dir: str) -> str:
    """Trainer output folder -> metric prefix: its name (``stage1``, ``stage2``, ``train``)."""
    name = os.path.basename(os.path.normpath(output_dir))
    if name not in STAGES:
        raise ValueError(f"no W&B metric prefix for the Trainer output folder {output_dir!r}: expected one of {STAGES}")
    return name


def trainer_callbacks(output_dir: str) -> list:
    """The callbacks that log a Trainer's metrics into the job's run (none when W&B is off)."""
    return [StageLogger(_RUN, stage_of(output_dir))] if _RUN is not None else []


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class StageLogger(TrainerCallback):
    """Trainer ``on_log`` -> ``<stage>/<key>`` against ``<stage>/step`` (the stage's global step)."""

    def __init__(self, run, stage: str):
        self.run, self.stage = run, stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {
            f"{self.stage}/{k}": v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        row[f"{self.stage}/step"] = state.global_step
        self.run.log(row)


def summary_of(record: dict, cfg: dict) -> dict:
    """What the run's summary holds: the record without its config and per-step losses."""
    out = {k: v for k, v in record.items() if k not in ("config", "train_loss", "wandb")}
    out["label"] = cfg["method"].get("label") or cfg["method"]["name"]
    checks = ((record.get("pilora") or {}).get("checks") or {}).values()
    out["T"] = max(checks) if checks else None
    return out


def _size_mb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def _files(path: str):
    """``(file, name)`` of ``path`` (a file: its base name) or of every file under it (names
    relative to its parent: ``predictions/boolq.jsonl``), in a stable order."""
    if os.path.isfile(path):
        yield path, os.path.basename(path)
        return
    top = os.path.dirname(os.path.normpath(path))
    for here, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(here, name)
            yield full, os.path.relpath(full, top)


def _add(art, path: str) -> None:
    """File by file: ``Artifact.add_dir`` prints a progress line for every folder."""
    for full, name in _files(path):
        art.add_file(full, name=name)


def adapter_metadata(cfg: dict, record: dict, adapter_dir: str) -> dict:
    """What the ``model`` artifact says about its adapter: the base model (config name and the
    weights' path or hub id, as PEFT saved it), the method, its ranks r and r' (r' for the methods
    that have one: PiLoRA and the budget-matched LoRA), the target modules and the run's task/seed."""
    saved = {}
    config_file = os.path.join(adapter_dir, "adapter_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            saved = json.load(f)
    method = cfg["method"]
    two = two_stage(cfg)
    targets = saved.get("target_modules") or method.get("target_modules") or cfg["model"].get("target_modules")
    return {
        "base_model": cfg["model"]["name"],
        "base_model_name_or_path": saved.get("base_model_name_or_path") or cfg["model"].get("path"),
        "method": method.get("label") or method["name"],
        "peft_type": saved.get("peft_type"),
        "r": method.get("r"),
        "supplementary_r": method.get("supplementary_r") if two else None,
        "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
        "rank_pattern": saved.get("rank_pattern") or None,
        "modules_to_save": saved.get("modules_to_save"),
        "task": cfg["task"]["name"],
        "seed": int(cfg["seed"]),
        "status": record.get("status"),
    }


def _keep_in_run_folder(run, path: str, cap: float) -> None:
    """Real copies of ``path`` (a file, or a folder's files) in the run's ``files/``, under their
    artifact names (W&B would symlink them, and offline artifact files stay in W&B's staging
    folder), so a copied run folder carries what the analysis reads."""
    if not path or not os.path.exists(path):
        return
    if _size_mb(path) > cap:
        log.info(
            "W&B: not copying %s into the run folder (%.0f MB > logger.artifact_max_mb=%g)", path, _size_mb(path), cap
        )
        return
    for full, name in _files(path):
        copy = os.path.join(run.dir, name)
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy(full, copy)
        run.save(copy, base_path=run.dir, policy="now")


# the files of the record artifact, also kept in the run's files/: results.json, importance.pt and a
# generation task's predictions/<set>.jsonl
RECORD_ARTIFACT = ("results", "importance", "predictions")


def finish_run(run, record: dict, cfg: dict, out: str, files: dict[str, str]) -> None:
    """Write the summary and the artifacts; ``files`` maps ``results``/``importance``/``adapter`` to
    paths (PiLoRA's compact ``adapter_pilora/`` is found next to ``adapter/``)."""
    import wandb

    global _RUN
    lg = cfg.get("logger") or {}
    cap = float(lg.get("artifact_max_mb", 200))
    run.summary.update(summary_of(record, cfg))
    for key in RECORD_ARTIFACT:
        _keep_in_run_folder(run, files.get(key), cap)
    adapter = files.get("adapter")
    if adapter:
        files = {**files, "adapter_pilora": os.path.join(os.path.dirname(os.path.normpath(adapter)), "adapter_pilora")}
    if lg.get("artifacts", True):
        name = artifact_name(_NAME or run_name(cfg, sweep_point(cfg, out)))
        for art_name, art_type, keys in (
            (f"{name}-record", "results", RECORD_ARTIFACT),
            (f"{name}-adapter", "model", ("adapter", "adapter_pilora")),
        ):
            meta = adapter_metadata(cfg, record, adapter) if art_type == "model" and adapter else None
            art, kept = wandb.Artifact(art_name, type=art_type, metadata=meta), 0
            for key in keys:
                path = files.get(key)
                if not path or not os.path.exists(path):
                    continue
                if _size_mb(path) > cap:
                    log.info("W&B: not uploading %s (%.0f MB > logger.artifact_max_mb=%g)", path, _size_mb(path), cap)
                    continue
                _add(art, path)
                kept += 1
            if kept:
                run.log_artifact(art)
    run.finish(exit_code=0 if record.get("status") == "complete" else 1)  # a failed record: a failed run
    _RUN = None
    _forget_name()


def _forget_name() -> None:
    global _NAME
    _NAME = None


def abort(run) -> None:
    """End the run of a job that raised (marked failed in W&B)."""
    global _RUN
    _RUN = None
    _forget_name()
    run.finish(exit_code=1)
