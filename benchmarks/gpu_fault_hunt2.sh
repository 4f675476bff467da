#!/usr/bin/env bash
# Bisect the batch-16 fast-loop fault of benchmarks/gpu_fault_hunt.py's model case: scope,
# compile backend, kernel kinds, each in its own process; then memcheck of the failing case.
OUT=${OUT:-/tmp/fault_hunt}; mkdir -p $OUT
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
H="python3 benchmarks/gpu_fault_hunt.py model --out $OUT --layers 2 --batch 16"
v() { name=$1; shift; timeout -k 5 ${VT:-100} env "$@" > $OUT/$name.log 2>&1; echo "== $name rc=$?"; grep "model \|tuned.*4096x4096\|tuned.*T=16 " $OUT/$name.log | cut -c1-220; }
v attn_inductor $H --scope attn
v all_aot_eager $H --scope all --backend aot_eager
v all_cudagraphs $H --scope all --backend cudagraphs
v all_nosmem DASS_CUDA_SMEM=0 $H --scope all
v all_nowg DASS_CUDA_WG=0 $H --scope all
v mlp_inductor $H --scope mlp
CS=/usr/local/cuda/bin/compute-sanitizer
VT=170 v memcheck_all $CS --tool memcheck --print-limit 6 $H --scope all
grep -A25 "=========" $OUT/memcheck_all.log | head -70 | cut -c1-250
