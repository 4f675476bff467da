#!/usr/bin/env bash
# The round-8 GPU calls (docs/speed.md, "round 8"), run from the repository root on the GPU
# machine. Round 8 adds the register kernel's GLU epilogue (act(gate) * up in the stacked
# gate+up product's own launch) and programmatic dependent launch (DASS_CUDA_PDL=1).
#   PART=A OUT=/dir bash benchmarks/gpu_call_round8.sh   build, every GLU configuration against
#                                                        cuBLAS (and PDL against no PDL, bit for
#                                                        bit), the 7B MLP block fused / unfused /
#                                                        PDL, tuning in a process of its own, then
#                                                        decoding at batch 1 and 16 with PDL
#   PART=B OUT=/dir bash benchmarks/gpu_call_round8.sh   right after A on the same machine: where a
#                                                        batch-1 step's time goes (PDL on), then
#                                                        decoding at batch 1 without PDL and at 4, 64
# Knobs: CTIME (checks), PTOKENS/PTIME (pretuning), BATCHES/GBUDGET/GTIME (decoding), STIME.
set -u
OUT=${OUT:-/tmp/gpu_round8}
PART=${PART:-A}
mkdir -p "$OUT"
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export DASS_TUNING_CACHE=/tmp/dass_cache/tuning.json
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)
if [ "$PART" = A ]; then
    timeout -k 5 ${CTIME:-220} python3 -X faulthandler benchmarks/gpu_glu_check.py --out $OUT/glu_check.json \
        --budget-s ${CBUDGET:-70} > $OUT/glu_check.log 2>&1
    echo "GLU check rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "^BAD" $OUT/glu_check.log | tail -12 | cut -c1-300
    grep -c "^BAD" $OUT/glu_check.log; grep "^BAD" $OUT/glu_check.log | head -5 | cut -c1-300
    timeout -k 5 ${PTIME:-90} python3 benchmarks/gpu_pretune.py --tokens ${PTOKENS:-1,16,64} > $OUT/pretune.log 2>&1
    echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"; tail -3 $OUT/pretune.log | cut -c1-200
    DASS_CUDA_PDL=1 timeout -k 5 ${GTIME:-250} python3 benchmarks/gpu_generate.py --out $OUT/generate_pdl.json \
        --budget-s ${GBUDGET:-230} --batches ${BATCHES:-1,16} > $OUT/generate_pdl.log 2>&1
    echo "generate (PDL) rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate_pdl.log | tail -12 | cut -c1-300
    cp $DASS_TUNING_CACHE $OUT/tuning_cache.json 2>/dev/null || true
else
    DASS_CUDA_PDL=1 timeout -k 5 ${STIME:-200} python3 benchmarks/gpu_step_profile.py --batch 1 --scopes dense,mlp,all \
        --out $OUT/step_profile_b1.json > $OUT/step_profile_b1.log 2>&1
    echo "step profile rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "USDT\|warn" $OUT/step_profile_b1.log | tail -24 | cut -c1-220
    if [ "${GTIME:-220}" -gt 0 ]; then
        timeout -k 5 ${PTIME:-60} python3 benchmarks/gpu_pretune.py --tokens ${PTOKENS:-4,256,4096} > $OUT/pretune_b.log 2>&1
        echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"
        DASS_CUDA_PDL=${PDL_B:-0} timeout -k 5 ${GTIME:-220} python3 benchmarks/gpu_generate.py --out $OUT/generate_b.json \
            --budget-s ${GBUDGET:-200} --batches ${BATCHES:-1,4,64} > $OUT/generate_b.log 2>&1
        echo "generate rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate_b.log | tail -14 | cut -c1-300
    fi
fi
echo "part $PART total $(( $(date +%s) - t0 )) s"
