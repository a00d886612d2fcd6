"""Shared fixtures: contained vLLM files, the tiny offline model, engine jobs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"

# vLLM leaves IPC sockets and temp files behind; keep them (and its compile cache) in .cache.
for var, sub in {"VLLM_CACHE_ROOT": "vllm", "VLLM_RPC_BASE_PATH": "ipc", "TMPDIR": "tmp",
                 "TRITON_CACHE_DIR": "triton", "HF_HOME": "hf"}.items():
    os.environ.setdefault(var, str(CACHE / sub))
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
for var, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                   "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                   # internal invariants raise instead of logging and recovering
                   "VLLM_EVICT_STRICT_CHECKS": "1"}.items():
    os.environ.setdefault(var, value)
# scripts/test.sh runs two pytest-xdist workers. vLLM binds each CPU engine's worker to core 0
# unless told otherwise, so two engines at once would share one core: give each pytest worker
# its own core instead (one OpenMP thread either way, so the numerics do not change).
# CORES: the cores this process may use (a container's cpuset need not start at 0).
CORES = sorted(os.sched_getaffinity(0))
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _XDIST_WORKER.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(CORES[int(_XDIST_WORKER[2:]) % len(CORES)])


def _built_model(name: str, *kind: str) -> str:
    """Build a tiny random model once; a file lock keeps two workers from building it at once."""
    from filelock import FileLock

    out = CACHE / "models" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").exists():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out),
                            *kind], check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """A tiny random-weight Llama (4 layers, 2 KV heads, head size 64) and its tokenizer."""
    return _built_model("tiny")


@pytest.fixture(scope="session")
def tiny_gemma3() -> str:
    """A tiny random-weight Gemma-3 (hybrid: sliding-window and full-attention layers)."""
    return _built_model("tiny-gemma3", "gemma3")


def run_engine_job(spec: dict, workdir: Path, *, vanilla: bool = False,
                   dump_dir: Path | None = None, page_trace_dir: Path | None = None,
                   timeout: int = 600) -> dict:
    """Run tests/helpers/engine_job.py in a fresh process; vanilla=True disables every plugin.
    dump_dir / page_trace_dir: where the plugin writes kept positions / pages per step."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.pop("VLLM_EVICT_DUMP_DIR", None)
    env.pop("VLLM_EVICT_PAGE_TRACE_DIR", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # offline engines must not write a server's metrics
    if vanilla:
        env["VLLM_PLUGINS"] = ""
    if dump_dir is not None:
        env["VLLM_EVICT_DUMP_DIR"] = str(dump_dir)
    if page_trace_dir is not None:
        env["VLLM_EVICT_PAGE_TRACE_DIR"] = str(page_trace_dir)
    log = workdir / "engine.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "tests.helpers.engine_job", str(spec_path),
                               str(out_path)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"engine job failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    result = json.loads(out_path.read_text())
    result["log"] = log.read_text()
    return result
