#!/usr/bin/env bash
# The round-7 GPU calls (docs/speed.md, "round 7"), run from the repository root on the GPU
# machine. Round 7 finishes split-K inside the register kernel (one launch a product); these
# calls measure what that changes, per matrix and in decoding.
#   PART=1 OUT=/dir bash benchmarks/gpu_call_round7.sh   build, probes, every-config correctness
#                                                        and the 7B per-matrix sweep at 1-128
#                                                        tokens, then tuning in a process of its
#                                                        own and the fast decode loop at batch 1
#                                                        and 16 (carry .gpu/g1: stashed for 2)
#   PART=2 OUT=/dir bash benchmarks/gpu_call_round7.sh   right after 1 on the same machine (carry
#                                                        .gpu/g2): greedy agreement on the pruned
#                                                        embedded model, Nsight Compute over the
#                                                        64-128-token kernels, decoding at batch
#                                                        4 and 64
#   PART=3 OUT=/dir bash benchmarks/gpu_call_round7.sh   the next session's first call: build,
#                                                        every register configuration one product
#                                                        at a time (the raw-cudaMalloc counters),
#                                                        where a batch-1 decode step's time goes,
#                                                        then round 7's faulting run again (batch
#                                                        1 then 16, MLP scope, pretuning without
#                                                        the 64-token bucket)
# Environment knobs: KTOKENS/KBUDGET/KTIME (kernel sweep), PTOKENS/PTIME (pretuning),
# BATCHES/GBUDGET/GTIME (decoding), PCASES/NTIME (ncu), RTIME (greedy).
set -u
OUT=${OUT:-/tmp/gpu_round7}
PART=${PART:-1}
mkdir -p "$OUT"
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export DASS_TUNING_CACHE=/tmp/dass_cache/tuning.json
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)
[ -f out/gpu/wgs_off ] && export DASS_CUDA_WGS=0 && echo "sparse-wgmma kernel off (part 1's probe failed)"
if [ "$PART" = 3 ]; then
    timeout -k 5 ${CTIME:-120} python3 -X faulthandler benchmarks/gpu_splitk_check.py \
        --shapes 256x1024,4096x1408,1408x4096 --tokens 1,9,16,64,128 > $OUT/splitk_check.log 2>&1
    echo "split-K check rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "^call" $OUT/splitk_check.log | tail -5 | cut -c1-300
    timeout -k 5 ${STIME:-220} python3 benchmarks/gpu_step_profile.py --batch 1 --scopes dense,mlp,all \
        --out $OUT/step_profile_b1.json > $OUT/step_profile_b1.log 2>&1
    echo "step profile rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "USDT\|warn" $OUT/step_profile_b1.log | tail -24 | cut -c1-220
    timeout -k 5 ${PTIME:-90} python3 benchmarks/gpu_pretune.py --tokens 1,16,1024 > $OUT/pretune.log 2>&1
    echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"
    timeout -k 5 ${GTIME:-200} python3 benchmarks/gpu_generate.py --out $OUT/generate_fault.json --budget-s ${GBUDGET:-180} \
        --batches 1,16 --scopes mlp > $OUT/generate_fault.log 2>&1
    echo "generate rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate_fault.log | tail -10 | cut -c1-300
elif [ "$PART" = 1 ]; then
    mkdir -p out/gpu
    [ -f .gpu/g1/smollm2.gguf.part00 ] && cp .gpu/g1/smollm2.gguf.part00 out/gpu/ && cp -r .gpu/g1/whl out/gpu/
    timeout -k 5 ${KTIME:-250} python3 benchmarks/gpu_kernels.py --out $OUT/kernels.json --shapes 7b \
        --tokens ${KTOKENS:-1,2,4,8,16,32,64,128} --budget-s ${KBUDGET:-200} > $OUT/kernels.log 2>&1
    echo "kernels rc=$? at $(( $(date +%s) - t0 )) s"
    grep -v "^ *[0-9]*b " $OUT/kernels.log | grep -v "^  " | tail -14 | cut -c1-400
    grep "T=" $OUT/kernels.log | cut -c1-220
    if ! python3 -c "import json,sys; p=json.load(open('$OUT/kernels.json')).get('wgs_probe',{}); sys.exit(0 if (p.get('max_err') is not None and p['max_err'] < 1e-2) else 1)"; then
        export DASS_CUDA_WGS=0; touch out/gpu/wgs_off; echo "sparse-wgmma kernel OFF for the rest of the session"
    fi
    timeout -k 5 ${PTIME:-90} python3 benchmarks/gpu_pretune.py --tokens ${PTOKENS:-1,16,64,1024} > $OUT/pretune.log 2>&1
    echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"; tail -3 $OUT/pretune.log | cut -c1-200
    timeout -k 5 ${GTIME:-220} python3 benchmarks/gpu_generate.py --out $OUT/generate.json --budget-s ${GBUDGET:-200} \
        --batches ${BATCHES:-1,16} > $OUT/generate.log 2>&1
    echo "generate rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate.log | tail -16 | cut -c1-300
    cp $DASS_TUNING_CACHE $OUT/tuning_cache.json 2>/dev/null || true
else
    # the greedy check is round 5's part C (it takes .gpu/g2 itself and finds part 1's stash)
    PART=C OUT=$OUT RTIME=${RTIME:-200} bash benchmarks/gpu_call_round5.sh
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -n "$NCU" ] && [ "${NTIME:-150}" -gt 0 ]; then
        SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
 --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
        timeout -k 5 ${NTIME:-150} "$NCU" --clock-control none --nvtx --nvtx-include "prof/" $SECTIONS \
            --print-nvtx-rename kernel -o "$OUT/prof" -f python3 benchmarks/gpu_profile.py \
            ${PCASES:+--cases $PCASES} > "$OUT/ncu_run.log" 2>&1
        echo "ncu rc=$? at $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/ncu_run.log" | cut -c1-300
        "$NCU" -i "$OUT/prof.ncu-rep" --page details --print-nvtx-rename kernel > "$OUT/ncu_details.txt" 2>&1
        "$NCU" -i "$OUT/prof.ncu-rep" --page raw --csv --print-nvtx-rename kernel > "$OUT/ncu_raw.csv" 2>&1
        rm -f "$OUT/prof.ncu-rep"
    fi
    if [ "${GTIME:-200}" -gt 0 ]; then
        timeout -k 5 ${PTIME:-80} python3 benchmarks/gpu_pretune.py --tokens ${PTOKENS:-4,64,256,4096} > $OUT/pretune_b.log 2>&1
        echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"; tail -3 $OUT/pretune_b.log | cut -c1-200
        timeout -k 5 ${GTIME:-200} python3 benchmarks/gpu_generate.py --out $OUT/generate_b.json \
            --budget-s ${GBUDGET:-180} --batches ${BATCHES:-4,64} > $OUT/generate_b.log 2>&1
        echo "generate rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate_b.log | tail -12 | cut -c1-300
    fi
fi
echo "part $PART total $(( $(date +%s) - t0 )) s"
