"""One W&B run per job, mirroring its ``results.json`` (``logger=wandb``; ``logger=none`` turns it off).

* **Name, group, tags:** ``<method>-<task>-<model>-s<seed>`` (method = ``method.label`` when set,
  e.g. ``lora_matched``), grouped by ``logger.group`` or else the sweep name, tagged
  ``method:<m>``, ``task:<t>``, ``model:<x>`` and ``stages:<1+2|2>``; ``job_type`` is
  ``two_stage`` (PiLoRA, budget-matched LoRA) or ``single_stage``.
* **Config:** the resolved Hydra config and nothing else. Trainer's own W&B callback is not used
  (it would add ~150 TrainingArguments keys at the top level, and stage 2 would overwrite
  stage 1's); :class:`StageLogger` logs the Trainer's metrics instead.
* **Metrics:** ``stage1/<key>`` for PiLoRA's importance pass, ``stage2/<key>`` for the training
  of the final adapter (the only stage of single-stage methods, so the curves of every method
  share their keys), each against its own step axis ``stage1/step`` / ``stage2/step``.
* **Summary:** everything ``results.json`` holds except the config (the run's config) and the
  per-step loss list (the ``stage2/loss`` history), plus ``label`` and ``T`` (importance checks).
* **Artifacts** (``logger.artifacts``, default on): ``<run>-record`` (type ``results``:
  ``results.json`` and, for two-stage methods, ``importance.pt``) and ``<run>-adapter`` (type
  ``adapter``: the stock-PEFT ``adapter/``), each skipped with a log line when larger than
  ``logger.artifact_max_mb``. ``results.json`` is also copied into the run's ``files/`` so an
  offline run folder carries its record.
* **No network:** with ``logger.mode=online``, a W&B server that cannot be reached (a TCP probe,
  at most 10 s) or a ``wandb.init`` that fails (``logger.init_timeout_s``, no API key) makes the
  run offline, with a warning and ``offline_fallback`` in the record's ``wandb`` entry; the
  job continues, and ``wandb sync`` uploads the run later.
* **Quiet:** W&B's console output (banners, sync hints, captured stdout) is off unless
  ``logger.verbose=true``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

log = logging.getLogger("pilora")
_RUN = None  # the job's run while it trains; StageLogger callbacks log into it
FALLBACK: str | None = None  # why the job's online run went offline (None: it did not)


def _safe(text) -> str:
    """W&B names and tags: letters, digits, ``-_.`` only (task names may hold a ``/``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def run_name(cfg: dict) -> str:
    method = cfg["method"].get("label") or cfg["method"]["name"]
    return _safe(f"{method}-{cfg['task']['name']}-{cfg['model']['name']}-s{cfg['seed']}")


def two_stage(cfg: dict) -> bool:
    from ..methods import METHODS

    return bool(cfg["method"].get("match_budget")) or METHODS[cfg["method"]["name"]].two_stage


def start_run(cfg: dict, out: str):
    """Open the job's W&B run (or return None when ``logger.name`` is not ``wandb``)."""
    global _RUN
    lg = cfg.get("logger") or {}
    if lg.get("name") != "wandb":
        return None
    import wandb

    method = cfg["method"].get("label") or cfg["method"]["name"]
    stages = "1+2" if two_stage(cfg) else "2"
    tags = [f"method:{method}", f"task:{cfg['task']['name']}", f"model:{cfg['model']['name']}", f"stages:{stages}"]
    verbose = bool(lg.get("verbose", False))
    timeout = float(lg.get("init_timeout_s") or 60)
    settings = dict(
        silent=not verbose, quiet=not verbose, console="auto" if verbose else "off", x_save_requirements=verbose
    )
    kwargs = dict(
        project=lg.get("project", "pilora"),
        entity=lg.get("entity"),
        dir=out,
        name=lg.get("run_name") or run_name(cfg),
        group=lg.get("group") or cfg.get("sweep_name"),
        tags=[str(t).replace(",", "_") for t in [*tags, *(lg.get("tags") or [])]],
        job_type="two_stage" if stages == "1+2" else "single_stage",
        config=cfg,
        reinit="finish_previous",
    )
    mode = lg.get("mode", "offline")
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
    for stage in ("stage1", "stage2"):
        run.define_metric(f"{stage}/step")
        run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    _RUN = run
    return run


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
    out = {"id": run.id, "project": run.project, "dir": run.dir}
    if FALLBACK is not None:
        out.update(mode="offline", offline_fallback=FALLBACK)
    return out


def stage_of(output_dir: str) -> str:
    """Trainer output folder -> metric prefix: PiLoRA's importance pass is ``stage1``; the training
    of the final adapter (``stage2/`` or a single-stage method's ``train/``) is ``stage2``."""
    return "stage1" if os.path.basename(os.path.normpath(output_dir)) == "stage1" else "stage2"


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


def _add(art, path: str) -> None:
    """File by file: ``Artifact.add_dir`` prints a progress line for every folder."""
    if os.path.isfile(path):
        art.add_file(path)
        return
    top = os.path.dirname(os.path.normpath(path))
    for here, _, names in os.walk(path):
        for name in sorted(names):
            full = os.path.join(here, name)
            art.add_file(full, name=os.path.relpath(full, top))


def finish_run(run, record: dict, cfg: dict, out: str, files: dict[str, str]) -> None:
    """Write the summary and the artifacts; ``files`` maps ``results``/``importance``/``adapter`` to paths."""
    import wandb

    global _RUN
    lg = cfg.get("logger") or {}
    run.summary.update(summary_of(record, cfg))
    record_file = files.get("results")
    if record_file and os.path.isfile(record_file):
        # a real copy (not W&B's symlink) so the offline run folder carries its record
        shutil.copy(record_file, os.path.join(run.dir, os.path.basename(record_file)))
        run.save(os.path.join(run.dir, os.path.basename(record_file)), base_path=run.dir, policy="now")
    if lg.get("artifacts", True):
        cap = float(lg.get("artifact_max_mb", 200))
        name = run_name(cfg)
        for art_name, art_type, keys in (
            (f"{name}-record", "results", ("results", "importance")),
            (f"{name}-adapter", "adapter", ("adapter",)),
        ):
            art, kept = wandb.Artifact(art_name, type=art_type), 0
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


def abort(run) -> None:
    """End the run of a job that raised (marked failed in W&B)."""
    global _RUN
    _RUN = None
    run.finish(exit_code=1)
