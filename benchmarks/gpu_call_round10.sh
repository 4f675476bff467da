#!/usr/bin/env bash
# The next GPU calls (docs/speed.md, "round 9", what is next): the two changes of round 9
# measured only on the CPU.
#   PART=A OUT=/dir bash benchmarks/gpu_call_round10.sh   build; the register kernel's deep
#       variant (DASS_CUDA_DEEP=1: 5-stage token ring, L2 prefetch 4 stages ahead) swept at 64
#       and 128 tokens beside every other kernel; tuning of 1, 16, 64, 1024 tokens (stacked
#       q/k/v included) in a process of its own; decoding, 32 layers, batches 1 and 16, with
#       stacked q/k/v (AccelerateConfig fuse_qkv)
#   PART=B OUT=/dir bash benchmarks/gpu_call_round10.sh   right after A: where a batch-1 step's
#       time goes (8 layers), scope all, separate and stacked q/k/v, and separate with
#       DASS_CUDA_CARVEOUT=100
# Knobs: KTIME/KBUDGET, PTIME, GTIME/GBUDGET, BATCHES, STIME, DEEP (1: keep the deep variant a
# candidate for the tuning and decoding too, once the sweep found it right). Environment and
# carried tuning cache: benchmarks/gpu_env.sh.
set -u
OUT=${OUT:-/tmp/gpu_round10}
PART=${PART:-A}
. benchmarks/gpu_env.sh
if [ "$PART" = A ]; then
    DASS_CUDA_DEEP=1 timeout -k 5 ${KTIME:-200} python3 -X faulthandler benchmarks/gpu_kernels.py --out $OUT/kernels.json \
        --shapes 7b --tokens 64,128 --skip-check --budget-s ${KBUDGET:-180} > $OUT/kernels.log 2>&1
    echo "kernels rc=$? at $(( $(date +%s) - t0 )) s"; grep "T=\|WRONG\|FAIL" $OUT/kernels.log | tail -12 | cut -c1-260
    python3 - $OUT/kernels.json <<'PY' || true
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    deep = min((t for k, t in r["configs_us"].items() if k.startswith("reg-deep")), default=None)
    plain = min((t for k, t in r["configs_us"].items() if k.startswith("reg-") and "deep" not in k), default=None)
    print(f"{r['matrix']:>8} {r['orientation']:>6} T={r['T']:<3} dense {r['dense_us']:6.1f}  reg {plain or 0:6.1f}  deep {deep or 0:6.1f} us")
PY
    export DASS_CUDA_DEEP=${DEEP:-0}
    timeout -k 5 ${PTIME:-150} python3 benchmarks/gpu_pretune.py --fuse-qkv --tokens 1,16,64,1024 > $OUT/pretune.log 2>&1
    echo "pretune rc=$? at $(( $(date +%s) - t0 )) s"; tail -4 $OUT/pretune.log | cut -c1-200
    left=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
    DASS_CUDA_PDL=0 timeout -k 5 $(( left - 5 )) python3 -X faulthandler benchmarks/gpu_generate.py --fuse-qkv \
        --out $OUT/generate_qkv.json --budget-s $(( left - 20 )) --batches ${BATCHES:-1,16} > $OUT/generate_qkv.log 2>&1
    echo "generate rc=$? at $(( $(date +%s) - t0 )) s"; grep -v "warn" $OUT/generate_qkv.log | tail -12 | cut -c1-300
else
    # separate and stacked q/k/v, then separate with the register kernel's carveout pinned to
    # the maximum (DASS_CUDA_CARVEOUT): do the 2:4 steps' extra gaps between kernels go?
    for run in "sep::" "qkv:--fuse-qkv:" "carve100::100"; do
        tag=${run%%:*}; rest=${run#*:}; q=${rest%%:*}; carve=${rest#*:}
        DASS_CUDA_CARVEOUT=$carve timeout -k 5 ${STIME:-120} python3 benchmarks/gpu_step_profile.py --batch 1 --layers 8 \
            --scopes dense,all $q --out $OUT/step_profile_$tag.json > $OUT/step_profile_$tag.log 2>&1
        echo "step profile $tag rc=$? at $(( $(date +%s) - t0 )) s"
        grep -v "USDT\|warn" $OUT/step_profile_$tag.log | tail -13 | cut -c1-200
    done
fi
end_call
