#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a DASH search on SmolLM2-135M-Instruct
# (ops softmax, swa:64, gla; a quarter of the all-softmax KV cache at its 8192-token context),
# then its evaluation against the selector baselines. Results land in runs/smollm2/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" release
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./build/examples/dash run --model models/SmolLM2-135M-Instruct.Q4_1.gguf --data data/sotu \
  --ops softmax,swa:64,gla --budget kv=0.25 --seq-len 256 \
  --prepare-tokens 4096 --tokens 12288 --eval-tokens 2048 \
  --retrieval-contexts 256,512 --retrieval-prompts 4 --out runs/smollm2 "$@"
