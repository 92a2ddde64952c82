"""``torchrun ... tests/fsdp_cpu_run.py <run.py arguments>``: run.py with accelerate's FSDP on CPU ranks.

accelerate 1.x turns ``fsdp_plugin`` into ``DistributedType.FSDP`` only for accelerator devices
(``AcceleratorState.__init__`` checks MULTI_GPU / MULTI_XPU / ...); CPU ranks (``use_cpu``, gloo)
stay ``MULTI_CPU`` and the Trainer wraps the model in DDP. This script adds MULTI_CPU to that
branch and changes nothing else: the Trainer then prepares the model with accelerate's own FSDP2
code (``fully_shard`` per ``transformer_layer_cls_to_wrap`` on a gloo device mesh), trains,
checkpoints and gathers the state dict exactly as on GPUs.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_init = AcceleratorState.__init__


def _init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # as accelerate does at the end of its own branch: later AcceleratorState() calls copy it back
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_cpu_fsdp

if __name__ == "__main__":
    sys.argv = [os.path.join(ROOT, "run.py"), *sys.argv[1:]]
    sys.path.insert(0, ROOT)
    runpy.run_path(sys.argv[0], run_name="__main__")
