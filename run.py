"""Entry point: compose the config, run one job, return its metric (for Hydra sweepers).

python run.py                                   # the offline demo (LoRA vs PiLoRA on MiniLM)
python run.py method=pilora task=glue/mrpc model=roberta-large
python run.py -m method=lora,pilora seed=0,1,2  # a sweep
python run.py experiment=table2_glue            # a paper table's sweep
"""

import sys

import hydra
from omegaconf import DictConfig

import hydra_setup  # registers the method schema and the resolvers conf/ uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pilora.runner.errors import exit_on_expected
    from pilora.runner.train import objective, train

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    # a fixable error ends with one message, a bug with its traceback; a basic sweep's point ends
    # itself on either, and is listed with its error when the sweep ends
    record = exit_on_expected(
        train,
        cfg,
        sweep=sweep,
        on_open=hydra_setup.job_config_saver(cfg),
        output_dir=cfg.get("output_dir"),
        on_error=hydra_setup.point_error_handler(HydraConfig.get()),
    )
    if isinstance(record, hydra_setup.FailedPoint):
        return record
    # a validation value, never a test metric: a sweeper (Optuna, Ax) tunes on what it is given
    return objective(record)


if __name__ == "__main__":
    if len(sys.argv) == 1:  # no arguments: the README's offline demo
        sys.argv.append("experiment=demo")
    # typos before composing; then every setting of a single run, before Hydra makes its folder
    error = hydra_setup.check_overrides(sys.argv[1:]) or hydra_setup.check_job(sys.argv[1:])
    if error:
        sys.exit(f"error: {error}")
    main()
