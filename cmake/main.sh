#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a DASH search on SmolLM2-135M-Instruct
# at a quarter of the all-softmax KV cache (its 8192-token context), then its evaluation against
# the selector baselines. Results land in runs/smollm2/.
#   With a GPU (nvcc found at build time and nvidia-smi sees a device): the settings of the search
#   results in README.md — ops softmax, swa:512, gla, gdn; 4096-token windows of the 233 State of
#   the Union addresses (2000–2021 held out); straight-through relaxation; half of the search's
#   calibration sequences repeating their first half; a minute on an H200.
#   Without: a small CPU run on the three addresses of data/sotu (ops softmax, swa:64, gla).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" release
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -n "$nvcc" ] && nvidia-smi -L >/dev/null 2>&1; then
  mkdir -p runs/data
  [ -d runs/data/sotu ] || tar -xJf data/sotu-1790-2021.tar.xz -C runs/data
  ./build/examples/dash run --model "$model" --data runs/data/sotu --device cuda \
    --ops softmax,swa:512,gla,gdn --budget kv=0.25 --seq-len 4096 --batch 2 \
    --prepare-tokens 4194304 --prepare-lr 3e-4 --tokens 2097152 --relaxation straight-through \
    --copy-fraction 0.5 \
    --eval-tokens 65536 --retrieval-contexts 1024,2048,4096 --retrieval-prompts 16 --out runs/smollm2 "$@"
else
  ./build/examples/dash run --model "$model" --data data/sotu \
    --ops softmax,swa:64,gla --budget kv=0.25 --seq-len 256 \
    --prepare-tokens 4096 --tokens 12288 --eval-tokens 2048 \
    --retrieval-contexts 256,512 --retrieval-prompts 4 --out runs/smollm2 "$@"
fi
