#!/usr/bin/env bash
# benchmarks/gpu_fault_hunt.py on the GPU machine: the kernel sweep, memcheck of a failing launch, the 2-layer model at batch 16
OUT=${OUT:-/tmp/fault_hunt}; mkdir -p $OUT
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "sanitizer: $CS"
timeout -k 5 240 python3 benchmarks/gpu_fault_hunt.py sweep --out $OUT > $OUT/hunt.log 2>&1; echo "sweep rc=$?"
grep -v "^module\|launches done" $OUT/hunt.log | tail -15 | cut -c1-400; grep "launches done\|^module" $OUT/hunt.log | tail -12
if [ -f $OUT/fail.json ] && [ -n "$CS" ] && ! grep -q module $OUT/fail.json; then
  timeout -k 5 120 $CS --tool memcheck --print-limit 8 python3 benchmarks/gpu_fault_hunt.py one --case "$(cat $OUT/fail.json)" > $OUT/sanitizer.log 2>&1
  echo "sanitizer rc=$?"; head -60 $OUT/sanitizer.log | cut -c1-300
  mv $OUT/fail.json $OUT/fail_kernel.json
fi
CUDA_LAUNCH_BLOCKING=1 timeout -k 5 200 python3 benchmarks/gpu_fault_hunt.py model --out $OUT --layers 2 --batch 16 > $OUT/model.log 2>&1; echo "model rc=$?"
grep -v Warning $OUT/model.log | tail -30 | cut -c1-300
