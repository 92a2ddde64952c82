"""Performance benchmarks: step time and memory of PiLoRA against LoRA and DoRA.

``python -m benchmarks.step_time`` (CPU or one CUDA device, 7B-shaped layers and a small LLaMA);
``python -m benchmarks.gpu_llama`` (a ~1B LLaMA on one CUDA device). See ``benchmarks/README.md``.

Modules: ``workloads`` (the setting, the workloads, one method's model and optimizer), ``harness``
(interleaved timing, operator and host counts, the memory probe), ``stats`` (medians, ratios, paired
ratios, stage-1 overhead), ``targets``, ``report`` (record, tables, JSON), ``runner`` (one workload,
every method), ``importance_probe`` (the importance pass's memory); ``step_time`` is the command line.
"""

import os

# set before torch loads: the CPU profiler otherwise logs a GPU probe error
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
