"""``python tests/slow_run.py <run.py arguments>``: run.py, with every training step of the stage
folder named by ``PILORA_SLOW_STAGE`` (``stage1`` / ``stage2`` / ``train``) delayed by
``PILORA_STEP_DELAY`` seconds, so that a fault test can SIGKILL the job in the middle of that stage.
With ``PILORA_SLOW_SAVE=<marker file>`` the final adapter save (after the last checkpoint, before the
final evaluation) first creates that file, then waits, so that the job can be killed there.
Nothing else changes: the restarted job is plain ``python run.py`` with the same arguments."""

import os
import runpy
import sys
import time

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_stage = os.environ.get("PILORA_SLOW_STAGE", "")
_delay = float(os.environ.get("PILORA_STEP_DELAY", "0.5"))
_step = transformers.Trainer.training_step


def _slow_step(self, *args, **kwargs):
    if os.path.basename(os.path.normpath(self.args.output_dir)) == _stage:
        time.sleep(_delay)
    return _step(self, *args, **kwargs)


transformers.Trainer.training_step = _slow_step

if os.environ.get("PILORA_SLOW_SAVE"):
    import pilora.export  # each method's save() imports write_adapters from here when it runs

    _save = pilora.export.write_adapters

    def _slow_save(*args, **kwargs):
        open(os.environ["PILORA_SLOW_SAVE"], "w").close()
        time.sleep(600)
        return _save(*args, **kwargs)

    pilora.export.write_adapters = _slow_save

if __name__ == "__main__":
    sys.argv = [os.path.join(ROOT, "run.py"), *sys.argv[1:]]
    sys.path.insert(0, ROOT)  # as for `python run.py`: run.py imports hydra_setup from the repository root
    runpy.run_path(sys.argv[0], run_name="__main__")
