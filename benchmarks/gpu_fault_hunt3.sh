#!/usr/bin/env bash
# Each attention configuration at 16 tokens forced in the 2-layer model's fast loop (gpu_fault_hunt.py configs)
OUT=${OUT:-/tmp/fault_hunt}; mkdir -p $OUT
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout -k 5 ${CT:-280} python3 benchmarks/gpu_fault_hunt.py configs --out $OUT --layers 2 --batch ${B:-16} --reps 1 > $OUT/configs.log 2>&1
echo "configs rc=$?"; grep -v "warn" $OUT/configs.log | tail -40 | cut -c1-250
