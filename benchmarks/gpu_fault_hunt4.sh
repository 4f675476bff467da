#!/usr/bin/env bash
# The faulting attention configuration (reg mt1 ks4 splits 8 at 16 tokens) in the 2-layer model's fast loop:
# without CUDA graphs, with Dynamo's cudagraphs backend, then under memcheck (inductor, reduce-overhead)
OUT=${OUT:-/tmp/fault_hunt}; mkdir -p $OUT
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
F='{"kind": "reg", "mt": 1, "ks": 4, "splits": 8}'
H="benchmarks/gpu_fault_hunt.py configs --out $OUT --layers 2 --batch 16 --reps 1 --max-configs 1"
for be in aot_eager cudagraphs inductor; do
  timeout -k 5 60 python3 $H --force "$F" --backend $be > $OUT/f_$be.log 2>&1; echo "== $be rc=$?"; grep "FAULT\|ok " $OUT/f_$be.log | cut -c1-200
done
timeout -k 5 200 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 4 python3 $H --force "$F" --no-cg-asserts > $OUT/f_memcheck.log 2>&1
echo "== memcheck rc=$?"; grep -v "warn" $OUT/f_memcheck.log | grep -B2 -A22 "=====\|FAULT\|ok " | head -90 | cut -c1-260
