#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one command, for one H100/H200-class GPU:
#
#     bash benchmarks/gpu_session.sh OUTDIR [WHEEL_DIR]
#
# Run from the repository root. Needs python with torch (CUDA), transformers and peft; hydra,
# omegaconf, datasets, wandb and the MiniLM package are not used. WHEEL_DIR, if given, holds wheels
# (e.g. peft 0.21.2 and transformers 5.24, to match the project's pins) that are installed into a
# temporary folder put first on PYTHONPATH, leaving the machine's environment as it is.
#
# PARTS picks the parts (default: all four, in this order):
#     llama     the ~1 B LLaMA, 2048 tokens, eager: LoRA vs PiLoRA stage 2 vs DoRA vs LoRA at r + r',
#               stage 1, memory (limit 150 s; an H200 took 97 s for it before lora_wide was added)
#     layers    7B-shaped layers, llama_small and host_stack, with LoRA at width r + r' as a control (120 s)
#     options   the ways of holding stage 2's B, on llama_small and on host_stack                (120 s)
#     compiled  the ~1 B LLaMA under torch.compile (inductor): LoRA, fused LoRA, PiLoRA, stage 1  (300 s)
# Where one command may run at most 10 minutes and bring back at most 8 files, run it twice:
# PARTS="llama layers" (≤ 270 s, 6 files), then PARTS="options compiled" (≤ 420 s, 7 files).
# Each part has its own time limit (LIMIT_LLAMA, LIMIT_LAYERS, LIMIT_OPTIONS, LIMIT_COMPILED,
# seconds) and writes its log and JSON into OUTDIR as it goes, so a part that runs out of time
# loses only itself; OUTDIR gets env.txt, summary.txt and each part's log and JSON.
set -u -o pipefail

out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [WHEEL_DIR]}
wheels=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if [ -n "$wheels" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
        || { echo "installing the wheels in $wheels failed" >&2; exit 1; }
    export PYTHONPATH="$site:$PYTHONPATH"
fi

{
    date -u
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch, transformers, peft
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
} > "$out/env.txt" 2>&1

status=0
part() {  # part NAME LIMIT_S COMMAND...: run one measurement, log it, note its exit code and time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "(stopped at the ${limit} s limit)" >> "$out/$name.log"
    echo "$name: exit $rc after $((SECONDS - start)) s: $*" | tee -a "$out/summary.txt"
    [ $rc -eq 0 ] || status=1
}

for p in ${PARTS:-llama layers options compiled}; do
    case $p in
        llama) part gpu_llama "${LIMIT_LLAMA:-150}" "$PY" -m benchmarks.gpu_llama --out "$out/gpu_llama.json" ;;
        layers) part gpu_layers "${LIMIT_LAYERS:-120}" "$PY" -m benchmarks.step_time --device cuda --repeats 30 \
            --warmup 3 --methods lora,lora_fused,pilora,lora_wide,stage1_k10,stage1_k1 --out "$out/gpu_layers.json" ;;
        options) part gpu_options "${LIMIT_OPTIONS:-120}" bash -c "$PY -m benchmarks.stage2_options --device cuda \
            --out $out/gpu_options.json && $PY -m benchmarks.stage2_options --device cuda --workload host_stack \
            --out $out/gpu_options_host_stack.json" ;;
        compiled) part gpu_llama_compiled "${LIMIT_COMPILED:-300}" "$PY" -m benchmarks.gpu_llama --compile \
            --compile-only --no-importance --out "$out/gpu_llama_compiled.json" ;;
        *) echo "unknown part '$p' in PARTS; the parts are: llama layers options compiled" >&2; exit 2 ;;
    esac
done

exit $status
