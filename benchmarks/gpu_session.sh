#!/usr/bin/env bash
# The GPU measurements of this round, in three consecutive calls on one H200 (the machine
# stays warm between them, so what a stage leaves under out/gpu/, ignored by .gitignore, is there for
# the next).
# The embedded model (a 98 MB GGUF) and the zero-shot packages do not fit the 64 MiB a call
# carries, so they travel in pieces: the first call of a session carries .gpu/x, the second
# .gpu/y (made with benchmarks/gpu_payload.sh on a machine with the project's .venv).
#
#   A: reconstruction and the compressed-checkpoint loader checked on CUDA; a 2-layer 7B
#      reconstruction probe; dass.infer's GPU tests and benchmarks (benchmarks/gpu_infer.sh)
#   B: the reconstruction grid on the embedded model at the protocol (benchmarks/reconstruction.py
#      --grid default), the best 2:4 model kept; issue 15's alpha table (benchmarks/gpu_alpha.sh)
#   C: the rest of the grid; zero-shot accuracy of the best 2:4 model (lm-eval, full validation
#      sets); a 32-layer LLaMA-2-7B-shaped model pruned with the default reconstruction
#
#   P, Q, R (the second session): keep_dense dispatch and generate(); zero-shot of the 2:4 model
#      at the default reconstruction with 1000 steps; DaSS, the steps curve and a higher rate
#   S, T, U (the third session): the 7B shape with reconstruction to the dense model
#      (target=model); zero-shot and perplexity with target=model; issue 15's table on the
#      embedded model; auto alpha under reconstruction
#
#   STAGE=A OUT=/dir bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
STAGE=${STAGE:?set STAGE=A, B or C}
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT" out/gpu /tmp/site
export PYTHONPATH="/tmp/site:src:tests" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
START=$(date +%s)
say() { echo "[$(($(date +%s) - START)) s] $*"; }
install() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" 2>&1 | tail -2; }
GGUF=out/gpu/SmolLM2-135M-Instruct.Q4_1.gguf
# the second call's payload (.gpu/y): the wheels of both payloads installed, the zero-shot data on
# PYTHONPATH, the model's pieces joined to the first one (kept in out/gpu by the first call)
take_y() {
    install out/gpu/whl/*.whl .gpu/y/whl/*.whl
    mkdir -p /tmp/zs && tar xJf .gpu/y/site.tar.xz -C /tmp/zs
    export PYTHONPATH="/tmp/site:/tmp/zs/site:src:tests"
    [ -f "$GGUF" ] || cat out/gpu/smollm2.gguf.part00 .gpu/y/smollm2.gguf.part01 .gpu/y/smollm2.gguf.part02 > "$GGUF"
    sha256sum "$GGUF" | cut -c1-16
}

case $STAGE in
A)
    mkdir -p out/gpu && cp -r .gpu/x/* out/gpu/  # for stage B, which does not carry .gpu/x (out/ is
    install out/gpu/whl/*.whl                    # ignored by .gitignore: kept on the warm machine)
    [ "${STASH_ONLY:-0}" = 1 ] && { ls -la out/gpu; exit 0; }
    say "reconstruction on CUDA (tiny models, bf16 and fp32)"
    timeout 60 $PY - >"$OUT/recon_cuda.log" 2>&1 <<'EOF'
import torch, dass
from dass.core.patterns import nm_violations
from tiny import tiny_model, calib
for dtype in (torch.bfloat16, torch.float32):
    for arch, scope in (("llama", "mlp"), ("llama", "all"), ("mixtral", "mlp"), ("gemma3", "all")):
        m = tiny_model(arch).to(dtype)
        r = dass.prune(m, "wanda", "2:4", scope, calibration=calib(8, 64), batch_size=4, device="cuda",
                       progress=False, reconstruct="steps=100,batch_tokens=256")
        bad = sum(nm_violations(x, 2, 4, "input") for n, x in m.named_parameters()
                  if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")))
        print(dtype, arch, scope, r.summary().splitlines()[0], "violations", bad, flush=True)
EOF
    tail -3 "$OUT/recon_cuda.log"
    say "compressed checkpoints through from_pretrained on CUDA"
    timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_hf_quantizer.py tests/test_reconstruct.py -x \
        >"$OUT/quantizer_recon_tests.log" 2>&1
    tail -2 "$OUT/quantizer_recon_tests.log"
    say "7B reconstruction probe: 2 layers, wanda 2:4, default reconstruction"
    timeout 120 $PY benchmarks/bench_prune.py --shape 7b --layers 2 --mode memory --methods wanda --reconstruct "" \
        --out "$OUT/recon7b_probe.json" >"$OUT/recon7b_probe.log" 2>&1
    tail -3 "$OUT/recon7b_probe.log"
    say "dass.infer"
    BUDGET=${INFER_BUDGET:-300} OUT="$OUT/infer" bash benchmarks/gpu_infer.sh >"$OUT/infer_console.log" 2>&1
    say "done"
    ;;
B)
    take_y
    say "reconstruction grid"
    timeout 430 $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --grid default \
        --device cuda --budget "${RECON_BUDGET:-360}" --resume --save-best out/gpu/best24 --out out/gpu/recon \
        >"$OUT/recon_grid.log" 2>&1
    cp out/gpu/recon/reconstruction.* "$OUT/" 2>/dev/null
    tail -30 "$OUT/recon_grid.log"
    say "alpha table"
    mkdir -p .alpha-gpu && ln -sf "../$GGUF" .alpha-gpu/SmolLM2-135M-Instruct.Q4_1.gguf \
        && ln -sf ../out/gpu/tokens-smollm2.pt .alpha-gpu/tokens-smollm2.pt
    MODELS=${ALPHA_MODELS:-"smollm2 built:qwen2 built:gemma"} LIMIT_S=${ALPHA_LIMIT:-50} OUT=out/gpu/alpha \
        timeout 170 bash benchmarks/gpu_alpha.sh >"$OUT/alpha_console.log" 2>&1
    (cd out/gpu && tar czf "$OUT/alpha.tgz" alpha)
    say "done"
    ;;
C)  # superseded by X and Y (the best model could not be saved: a GGUF-loaded model is not serialisable)
    echo "use STAGE=X then STAGE=Y"
    ;;
X)  # carries .gpu/x: the first piece of the GGUF, the token ids, the wheels (lm-eval's and gguf)
    mkdir -p out/gpu && cp -r .gpu/x/* out/gpu/
    say "7B shape, 32 layers, default reconstruction"
    timeout "${B7_LIMIT:-300}" $PY benchmarks/bench_prune.py --shape 7b --mode memory --methods "${B7_METHODS:-dass}" \
        --reconstruct "" --out "$OUT/recon7b.json" >"$OUT/recon7b.log" 2>&1
    tail -6 "$OUT/recon7b.log"
    say "done"
    ;;
Y)  # carries .gpu/y: the other pieces of the GGUF and the zero-shot data
    take_y
    say "the best 2:4 model of stage B, with zero-shot accuracy"
    timeout 260 $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --device cuda \
        --configs "${ZS_CONFIG:-sparsegpt@2:4+steps=500,lr=0.003}" --zeroshot piqa,hellaswag,winogrande,arc_easy,arc_challenge \
        --out "$OUT/zeroshot" >"$OUT/zeroshot.log" 2>&1
    tail -4 "$OUT/zeroshot.log"
    say "4:8 and a higher learning rate"
    timeout "${Y_LIMIT:-230}" $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --device cuda \
        --configs ${Y_CONFIGS:-sparsegpt@4:8 "sparsegpt@4:8+steps=500,lr=0.003" "wanda@2:4+steps=500,lr=0.01"} \
        --out "$OUT/recon_y" >"$OUT/recon_y.log" 2>&1
    tail -6 "$OUT/recon_y.log"
    say "done"
    ;;
P)  # second session, call 1 of 3 (carries .gpu/x): "never slower than dense" with a dense copy
    mkdir -p out/gpu && cp -r .gpu/x/* out/gpu/
    export DASS_TUNING_CACHE=/tmp/dass_infer_tuning.json
    say "dispatch with keep_dense, LLaMA-2-7B MLP shapes, every token bucket"
    timeout 260 $PY -m dass bench --what dispatch --keep-dense --shapes 7b \
        --tokens 1,2,4,8,16,32,64,128,256,512,1024,4096,16384 --reps 5 --target-ms 4 \
        --out "$OUT/dispatch_keep_dense.json" >"$OUT/dispatch_keep_dense.log" 2>&1
    tail -16 "$OUT/dispatch_keep_dense.log"
    say "generate() with keep_dense, 32 layers"
    timeout 200 $PY -m dass generate --synthetic 7b --layers 32 --batches 1,4,16,64 --prompt-len 64 --keep-dense \
        --new-tokens 32 --reps 3 --modes graphs,eager --max-seconds 185 --out "$OUT/generate_keep_dense.json" \
        >"$OUT/generate_keep_dense.log" 2>&1
    tail -12 "$OUT/generate_keep_dense.log"
    say "done"
    ;;
Q)  # call 2 of 3 (carries .gpu/y): zero-shot of the best 2:4 setting; DaSS and the steps curve at the defaults
    take_y
    say "zero-shot"
    timeout 300 $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --device cuda \
        --configs "${ZS_CONFIG:-sparsegpt@2:4+steps=1000}" --zeroshot piqa,hellaswag,winogrande,arc_easy,arc_challenge \
        --out "$OUT/zeroshot2" >"$OUT/zeroshot2.log" 2>&1
    tail -4 "$OUT/zeroshot2.log"
    say "defaults"
    timeout 250 $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --device cuda \
        --configs ${Q_CONFIGS:-"dass@2:4+" "wanda@2:4+steps=100" "wanda@2:4+steps=250"} --budget 200 \
        --out "$OUT/recon_q" >"$OUT/recon_q.log" 2>&1
    tail -6 "$OUT/recon_q.log"
    say "done"
    ;;
R)  # call 3 of 3 (carries nothing; the model is in out/gpu from Q)
    say "more of the grid at the defaults"
    timeout 520 $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --device cuda \
        --configs ${R_CONFIGS:-"dass:alpha=1@2:4+" "wanda@2:4+lr=0.03" "wanda@2:4+steps=1000" "dass:alpha=auto@2:4+"} \
        --budget 400 --out "$OUT/recon_r" >"$OUT/recon_r.log" 2>&1
    tail -8 "$OUT/recon_r.log"
    say "done"
    ;;
S)  # third session, call 1 of 3 (carries .gpu/x): what target=model costs on the 7B shape
    mkdir -p out/gpu && cp -r .gpu/x/* out/gpu/
    install out/gpu/whl/*.whl
    say "7B shape, 32 layers, reconstruction to the dense model"
    timeout "${S_LIMIT:-330}" $PY benchmarks/bench_prune.py --shape 7b --mode memory --methods dass \
        --reconstruct "target=model" --out "$OUT/recon7b_model.json" >"$OUT/recon7b_model.log" 2>&1
    tail -6 "$OUT/recon7b_model.log"
    say "done"
    ;;
T)  # call 2 of 3 (carries .gpu/y): target=model on the embedded model, zero-shot of the 2:4 model
    take_y
    say "zero-shot with target=model"
    timeout 280 $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt --device cuda \
        --configs "${ZS_CONFIG:-sparsegpt@2:4+steps=500,lr=0.003,target=model}" \
        --zeroshot piqa,hellaswag,winogrande,arc_easy,arc_challenge --out "$OUT/zeroshot3" >"$OUT/zeroshot3.log" 2>&1
    tail -4 "$OUT/zeroshot3.log"
    say "target=model against target=block"
    timeout "${T_LIMIT:-290}" $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt \
        --device cuda --configs ${T_CONFIGS:-"wanda@2:4+target=model" "dass@2:4+target=model" "sparsegpt@4:8+steps=500,lr=0.003,target=model"} \
        --budget 200 --out "$OUT/recon_t" >"$OUT/recon_t.log" 2>&1
    tail -6 "$OUT/recon_t.log"
    say "done"
    ;;
U)  # call 3 of 3 (carries nothing): issue 15's table on the embedded model; auto under reconstruction
    export PYTHONPATH="/tmp/site:/tmp/zs/site:src:tests"
    say "alpha table, the embedded model"
    mkdir -p .alpha-gpu && ln -sf "../$GGUF" .alpha-gpu/SmolLM2-135M-Instruct.Q4_1.gguf \
        && ln -sf ../out/gpu/tokens-smollm2.pt .alpha-gpu/tokens-smollm2.pt
    CONFIGS="dense wanda dass:alpha=0.5 dass:alpha=1 dass:alpha=auto dass:alpha=auto,rescale=none" \
        MODELS=smollm2 LIMIT_S=${ALPHA_LIMIT:-300} OUT=out/gpu/alpha3 \
        timeout 320 bash benchmarks/gpu_alpha.sh >"$OUT/alpha_console.log" 2>&1
    (cd out/gpu && tar czf "$OUT/alpha3.tgz" alpha3)
    say "auto alpha under reconstruction"
    timeout "${U_LIMIT:-200}" $PY benchmarks/reconstruction.py --model "$GGUF" --tokens out/gpu/tokens-smollm2.pt \
        --device cuda --configs ${U_CONFIGS:-"dass:alpha=auto@2:4+"} --out "$OUT/recon_u" >"$OUT/recon_u.log" 2>&1
    tail -6 "$OUT/recon_u.log"
    say "done"
    ;;
esac
# at most 8 files come back from a call: the logs travel as one archive
(cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tgz ./*.log && rm -f ./*.log)
ls -la "$OUT" "$OUT"/* 2>/dev/null | head -30

