"""PiLoRA (Alg. 1) as a method: stage 1 (a plain LoRA whose gradients score each row,
``pilora.importance``; run by the runner, :func:`pilora.runner.train.run_stage1`), its partition
into dominant and supplementary rows (``pilora.partition``), and stage 2 from the pretrained
weights: rank-r adapters on the dominant rows, rank-r' on the rest (``pilora.layer``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .base import JobContext, Method, Plan, register_method

log = logging.getLogger("pilora")


def check_partition(cfg) -> None:
    """The partition a stage-1 user splits rows with: a known strategy, only arguments it takes
    (a misspelled one would split with the default), shares in (0, 1]."""
    from ..partition import PARTITIONS, check_args

    if cfg.partition.name not in PARTITIONS:
        raise ValueError(f"unknown partition {cfg.partition.name!r}; choose one of {sorted(PARTITIONS)}")
    check_args(cfg.partition.name, cfg.partition.args or {}, prefix="method.partition.args.")
    for name in ("tau", "threshold", "fraction"):
        if name in (cfg.partition.args or {}):
            v = float(cfg.partition.args[name])
            if not 0 < v <= 1:
                raise ValueError(f"partition {name} must lie in (0, 1], got {v}")


def stage1_partition(cfg, job: JobContext):
    """Stage 1 (or the statistics it reuses) and its partition: ``(stats, path, masks)``, the masks
    checked to agree across ranks."""
    from ..distributed import check_ranks_agree
    from ..partition import partition

    stats, path = job.stage1(cfg)
    masks = partition(stats, cfg.partition.name, **cfg.partition.args)
    check_ranks_agree(masks, stats)
    return stats, path, masks


def interpretations(cfg, max_grad_norm: float | None) -> dict[str, str]:
    """Readings of what the paper leaves open, as this run applies them (the record's
    ``pilora.interpretations``; README "Evaluation protocols" lists the same three)."""
    if cfg.supplementary_alpha is None:
        scale = (
            f"the supplementary adapter (rank r' = {cfg.supplementary_r}) is scaled by alpha/r = "
            f"{cfg.alpha}/{cfg.r}, the dominant adapter's s, not alpha/r' (method.supplementary_alpha=null)"
        )
    else:
        scale = (
            f"the supplementary adapter is scaled by method.supplementary_alpha/r' = "
            f"{cfg.supplementary_alpha}/{cfg.supplementary_r}"
        )
    clip = (
        f"after gradient clipping to norm {max_grad_norm} (trainer.max_grad_norm), the gradients the optimizer uses"
        if max_grad_norm and max_grad_norm > 0
        else "without clipping (trainer.max_grad_norm is off)"
    )
    return {
        "supplementary_scale": scale,
        "cumulative_threshold": (
            "Fig. 6's cumulative importance threshold is a share of the hit counts SigmaH: rows sorted by "
            "H (ties by SigmaS), the shortest prefix whose H sums to threshold x SigmaH is dominant"
        ),
        "score_gradients": (
            f"S and SigmaS come from the adapters' gradients {clip}, after accumulation and all-reduce"
        ),
    }


@dataclass(frozen=True)
class PiLoRA(Method):
    def check(self, cfg) -> None:
        if int(cfg.supplementary_r) > int(cfg.r):
            raise ValueError(f"supplementary rank r' must satisfy 0 ≤ r' ≤ r = {cfg.r}, got {cfg.supplementary_r}")
        super().check(cfg)

    def rank(self, cfg, masks, stage) -> int:
        return super().rank(cfg, masks, 1 if masks is None else stage)  # without masks it is stage 1

    def after_injection(self, peft_model, cfg, masks, stage) -> None:
        if masks is not None and stage != 1:
            from ..layer import to_pilora

            to_pilora(peft_model, masks, int(cfg.supplementary_r), cfg.supplementary_alpha)  # fused by default

    def before_training(self, cfg, job: JobContext) -> Plan:
        from ..partition import dominant_fractions

        stats, path, masks = stage1_partition(cfg, job)
        fractions = dominant_fractions(masks)
        log.info("PiLoRA partition %s: dominant fraction %.3f", cfg.partition.name, fractions["overall"])
        section = {
            "importance_file": path,
            "partition": cfg.partition.name,
            "partition_args": dict(cfg.partition.args),
            "checks": {k: s.checks for k, s in stats.modules.items()},
            # steps whose check was dropped with the update an fp16 loss scaler skipped
            "skipped_checks": list(stats.meta.get("skipped_checks", [])),
            "dominant_fraction": fractions["overall"],
            "dominant_fraction_per_module": {k: v for k, v in fractions.items() if k != "overall"},
            # the paper's open points as this run reads them (README "Evaluation protocols")
            "interpretations": interpretations(cfg, job.trainer.get("max_grad_norm", 1.0)),
        }
        return Plan(
            cfg, masks, stats, path, stage="stage2", title="PiLoRA stage 2", sections={self.record_key: section}
        )


register_method("pilora", PiLoRA(two_stage=True, record_key="pilora", rows=(("pilora", "PiLoRA"),)))
