#!/usr/bin/env bash
# The round-4 GPU call (docs/speed.md, "round 4"): the 7B kernel sweep with correctness
# checks, the fast decode loop at batch 1 (dense, 2:4 MLP, 2:4 all), then Nsight Compute on
# four 128-token kernels. Run from the repository root on the GPU machine:
#   OUT=/dir bash benchmarks/gpu_call_round4.sh      (about 4.5 minutes on an H100)
set -u
OUT=${OUT:-/tmp/gpu_round4}
mkdir -p "$OUT"
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 230 python3 benchmarks/gpu_kernels.py --out $OUT/kernels_wide.json --shapes 7b --tokens 16,32,64,128,256 --budget-s 150 > $OUT/kernels_wide.log 2>&1; echo kernels rc=$?
grep -v "^  7b" $OUT/kernels_wide.log | tail -14 | cut -c1-400; grep "T=" $OUT/kernels_wide.log | cut -c1-200
timeout 160 python3 benchmarks/gpu_generate.py --out $OUT/generate_fast.json --budget-s 140 --batches 1 > $OUT/generate.log 2>&1; echo gen rc=$?; tail -12 $OUT/generate.log | cut -c1-300
OUT=$OUT PTIME=60 PCASES=7b-gate+up-output-128-reg-mt1-ks2-s1,7b-gate+up-output-128-wg-mt1-wg1x2-ks4-s3,7b-gate+up-input-128-reg-mt4-w4x2-ks2-s1,7b-gate+up-output-128-reg-mt1-w4x2-ks2-s1 bash benchmarks/gpu_profile.sh 2>&1 | tail -8
