#!/usr/bin/env bash
# One GPU call for the CUDA 2:4 kernels (issue 21): build + layout probe + every-bucket
# correctness + per-matrix sweep (benchmarks/gpu_kernels.py), then the dispatcher's MLP-block
# sweep with the new path among the candidates (dass bench --what dispatch). Run from the
# repository root on the GPU machine: OUT=/dir bash benchmarks/gpu_round3.sh
set -u
OUT=${OUT:-/tmp/gpu_round3}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export DASS_CACHE=${DASS_CACHE:-/tmp/dass_cache} DASS_TUNING_CACHE=${DASS_TUNING_CACHE:-/tmp/dass_cache/tuning.json}
KBUDGET=${KBUDGET:-240}
DBUDGET=${DBUDGET:-200}
SHAPES=${SHAPES:-7b,13b,70b}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
git log --oneline -1 2>/dev/null
timeout -k 5 $((KBUDGET + 120)) python3 benchmarks/gpu_kernels.py --out "$OUT/h200_kernels.json" --shapes "$SHAPES" \
    --budget-s "$KBUDGET" ${KARGS:-} 2>&1 | tee "$OUT/kernels.log"
echo "=== kernels rc=${PIPESTATUS[0]} ==="
if [ "$DBUDGET" -gt 0 ]; then
    timeout -k 5 "$DBUDGET" python3 -m dass bench --what dispatch --shapes 7b \
        --tokens ${DTOKENS:-1,2,4,8,16,32,64,128,256,1024,4096,16384} --reps 5 --target-ms 4 \
        --out "$OUT/h200_dispatch.json" 2>&1 | tail -60 | tee "$OUT/dispatch.log"
    echo "=== dispatch rc=${PIPESTATUS[0]} ==="
fi
cp "$DASS_TUNING_CACHE" "$OUT/tuning_cache.json" 2>/dev/null || true
