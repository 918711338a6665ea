#!/usr/bin/env bash
# The CUDA path, every method, in fp16: the embedded models and 2-block twins of opt-1.3b and
# llama-3-8b (experiments/gpu_check.py). At most ~8 minutes on one GPU; results under
# results/bench/gpu/. Exit status: 0 every run inside its band, 1 otherwise, 2 no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec timeout 900 python -m experiments.gpu_check --device cuda --dtype float16 "$@"
