#!/usr/bin/env bash
# The next GPU call (docs/speed.md, "round 9", what is next): stacked q/k/v (AccelerateConfig
# fuse_qkv, new in round 9 and measured only on the CPU) against separate projections.
#   OUT=/dir bash benchmarks/gpu_call_round10.sh
# 1. tuning of 1, 16, 64, 1024 tokens for every 7B shape, stacked q/k/v included, in a
#    process of its own;
# 2. where a batch-1 step's time goes (8 layers), scope all, separate and stacked q/k/v;
# 3. decoding, 32 layers, batches 1 and 16, scopes mlp and all with stacked q/k/v (the dense
#    and mlp rows are the same as without it, so they compare with round 9's).
# Knobs: PTIME, STIME, GTIME/GBUDGET, BATCHES.
set -u
OUT=${OUT:-/tmp/gpu_round10}
mkdir -p "$OUT" /tmp/dass_cache
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export DASS_TUNING_CACHE=/tmp/dass_cache/tuning.json
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)
timeout -k 5 ${PTIME:-150} python3 benchmarks/gpu_pretune.py --fuse-qkv --tokens 1,16,64,1024 > $OUT/pretune.log 2>&1
echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"; tail -4 $OUT/pretune.log | cut -c1-200
for q in "" "--fuse-qkv"; do
    tag=${q:+_qkv}
    timeout -k 5 ${STIME:-100} python3 benchmarks/gpu_step_profile.py --batch 1 --layers 8 --scopes dense,all $q \
        --out $OUT/step_profile$tag.json > $OUT/step_profile$tag.log 2>&1
    echo "step profile ${q:-separate} rc=$? at $(( $(date +%s) - t0 )) s"
    grep -v "USDT\|warn" $OUT/step_profile$tag.log | tail -13 | cut -c1-200
done
DASS_CUDA_PDL=0 timeout -k 5 ${GTIME:-300} python3 -X faulthandler benchmarks/gpu_generate.py --fuse-qkv \
    --out $OUT/generate_qkv.json --budget-s ${GBUDGET:-280} --batches ${BATCHES:-1,16} > $OUT/generate_qkv.log 2>&1
echo "generate rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate_qkv.log | tail -12 | cut -c1-300
cp $DASS_TUNING_CACHE $OUT/tuning_cache.json 2>/dev/null || true
echo "total $(( $(date +%s) - t0 )) s"
