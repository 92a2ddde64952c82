"""Performance benchmarks: step time and memory of PiLoRA against LoRA and DoRA.

``python -m benchmarks.step_time`` (CPU or one CUDA device, 7B-shaped layers and a small LLaMA);
``python -m benchmarks.gpu_llama`` (a ~1B LLaMA on one CUDA device). See ``benchmarks/README.md``.
"""
