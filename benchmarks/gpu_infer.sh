#!/usr/bin/env bash
# One GPU session for dass.infer (the 2:4 kernels, the dispatcher, generate()), in at most
# 8 minutes (SMOKE=1: about one minute). Run from the repository root on the GPU machine:
#
#     OUT=/some/dir bash benchmarks/gpu_infer.sh            # full run
#     SMOKE=1 OUT=/some/dir bash benchmarks/gpu_infer.sh    # first check
#
# Parts, cheapest and most informative first, each time-boxed; a failing part does not stop
# the others:
#   1. correctness: every kernel at every token bucket, both orientations, fp16 and bf16;
#      generate() gives the dense model's greedy tokens (GPU tests of tests/test_infer_gpu.py)
#   2. host time per call (dense vs NM24Linear paths vs accelerated MLP), then the
#      dispatcher + MLP block over T in {1,...,16384}, LLaMA-2-7B shapes, both orientations:
#      every path's time per matrix, the choice, the block's GPU time vs dense
#      (dass bench --what host,dispatch; JSON: $OUT/dispatch.json)
#   3. generate(): 7B shape, 32 layers, random 2:4 weights (DaSS orientation, MLP scope),
#      bf16, batch 1/4/16/64, decode graphs on and eager, dense vs accelerated
#      (dass generate --synthetic 7b; JSON: $OUT/generate.json)
#   4. the rest of the GPU tests (tests/test_accelerate.py, tests/test_infer_gpu.py,
#      tests/test_speed_paths.py -k cuda)
# The winners of the tuner (the on-disk cache parts 2-4 share) end in $OUT/tuning_cache.json,
# the console in $OUT/gpu_infer.log. At most 5 files in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_infer_out}
mkdir -p "$OUT"
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-$([ "$SMOKE" = 1 ] && echo 60 || echo 465)}  # seconds for all parts
export PYTHONPATH="src:tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export DASS_TUNING_CACHE=${DASS_TUNING_CACHE:-/tmp/dass_infer_tuning.json}
export HF_HUB_OFFLINE=1
START=$(date +%s)

# part NAME LIMIT CMD...: run CMD for at most LIMIT seconds (less if the budget is nearly spent)
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        echo "=== $name: skipped, budget spent ==="
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit} s, elapsed $(($(date +%s) - START)) s) ==="
    timeout -k 5 "$limit" "$@"
    echo "=== $name: rc=$? elapsed $(($(date +%s) - START)) s ==="
}

main() {
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    git log --oneline -1 2>/dev/null
    T_ALL=1,2,4,8,16,32,64,128,256,512,1024,4096,16384
    if [ "$SMOKE" = 1 ]; then
        part kernels-smoke 25 $PY -m pytest -q -x -p no:cacheprovider tests/test_infer_gpu.py -k "every_bucket and bfloat16"
        part dispatch-smoke 25 $PY -m dass bench --what host,dispatch --shapes 7b --tokens 1,16,64 --reps 3 --target-ms 2 \
            --out "$OUT/dispatch_smoke.json"
        part generate-smoke 20 $PY -m dass generate --synthetic 7b --layers 2 --batches 1,16 --new-tokens 8 --reps 1 \
            --modes graphs,eager --max-seconds 15 --out "$OUT/generate_smoke.json"
    else
        part correctness 60 $PY -m pytest -q -x -p no:cacheprovider tests/test_infer_gpu.py -k "every_bucket or generate_gives"
        part dispatch 200 $PY -m dass bench --what host,dispatch --shapes 7b --tokens "$T_ALL" --reps 5 --target-ms 4 \
            --out "$OUT/dispatch.json"
        part generate 150 $PY -m dass generate --synthetic 7b --layers 32 --batches 1,4,16,64 --prompt-len 64 \
            --new-tokens 32 --reps 3 --modes graphs,eager --max-seconds 135 --out "$OUT/generate.json"
        part gpu-tests 80 $PY -m pytest -q -p no:cacheprovider tests/test_accelerate.py tests/test_infer_gpu.py \
            tests/test_speed_paths.py -k "not interpreter and (gpu or cuda or test_infer_gpu or test_accelerate)"
    fi
    [ -f "$DASS_TUNING_CACHE" ] && cp "$DASS_TUNING_CACHE" "$OUT/tuning_cache.json"
    echo "=== done in $(($(date +%s) - START)) s ==="
}

main 2>&1 | tee "$OUT/gpu_infer.log"
