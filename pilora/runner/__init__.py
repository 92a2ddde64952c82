"""The experiment runner: job folders, resume, records, W&B, console and the shared training run
(:func:`pilora.runner.train.train`). It uses Hydra/OmegaConf configs; :mod:`pilora` itself does not."""
