#!/usr/bin/env bash
# One GPU call: build the 2:4 kernels, then Nsight Compute over benchmarks/gpu_profile.py's
# cases (one launch each), the report as text (details + raw CSV), the SASS of the extension.
# Run from the repository root on the GPU machine: OUT=/dir bash benchmarks/gpu_profile.sh
set -u
OUT=${OUT:-/tmp/gpu_profile}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DASS_CACHE=${DASS_CACHE:-/tmp/dass_cache}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
t0=$(date +%s)
python3 -c "from dass.infer import cuda as cu; print('build', cu.load(), cu.unavailable_reason())"
echo "build $(( $(date +%s) - t0 )) s"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
 --section WarpStateStats --section SourceCounters --section Occupancy --section LaunchStats --section SchedulerStats --section InstructionStats"
timeout ${PTIME:-240} "$NCU" --clock-control none --nvtx --nvtx-include "prof/" $SECTIONS --print-nvtx-rename kernel \
    -o "$OUT/prof" -f python3 benchmarks/gpu_profile.py ${PCASES:+--cases $PCASES} > "$OUT/ncu_run.log" 2>&1
echo "ncu rc=$?"; tail -20 "$OUT/ncu_run.log"
"$NCU" -i "$OUT/prof.ncu-rep" --page details --print-nvtx-rename kernel > "$OUT/ncu_details.txt" 2>&1
"$NCU" -i "$OUT/prof.ncu-rep" --page raw --csv --print-nvtx-rename kernel > "$OUT/ncu_raw.csv" 2>&1
"$NCU" -i "$OUT/prof.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu_source.csv" 2>&1 || true
SO=$(ls "$DASS_CACHE"/cuda-ext/*/*.so | head -1)
cuobjdump -sass "$SO" 2>&1 | xz -6 > "$OUT/sass.txt.xz"
ls -la "$OUT"; echo "total $(( $(date +%s) - t0 )) s"
