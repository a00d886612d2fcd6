#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two workers, one per core: most of an engine test is vLLM's start-up, which runs on one core.
# Each test file stays on one worker (its engine fixtures are per module).
WORKERS="${VLLM_EVICT_TEST_WORKERS:-$(( $(nproc) < 2 ? 1 : 2 ))}"
exec .venv/bin/python -m pytest -q -ra -n "$WORKERS" --dist loadfile "$@"
