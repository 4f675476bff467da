# Sourced by the GPU call scripts (gpu_call_round9.sh, gpu_call_round10.sh) after they set OUT
# and PART: the environment every call runs in, the GPU's name and clocks, t0 for the elapsed
# times, and end_call for the end of each call. A tuning cache at .gpu/tuning.json (carried
# from an earlier call of the same session) is used and updated.
mkdir -p "$OUT" /tmp/dass_cache
export PYTHONPATH=src DASS_CACHE=/tmp/dass_cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export DASS_TUNING_CACHE=/tmp/dass_cache/tuning.json
[ -f .gpu/tuning.json ] && cp .gpu/tuning.json $DASS_TUNING_CACHE && echo "tuning cache carried in"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)

# the tuning cache comes back with the call's files; the total time last
end_call() {
    cp $DASS_TUNING_CACHE $OUT/tuning_cache.json 2>/dev/null || true
    echo "part $PART total $(( $(date +%s) - t0 )) s"
}
