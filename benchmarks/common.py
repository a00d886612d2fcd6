"""Helpers shared by the benchmarks: contained vLLM files, results I/O, the default model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
sys.path.insert(0, str(ROOT))


def contain_vllm_files() -> None:
    for var, sub in {"VLLM_CACHE_ROOT": "vllm", "VLLM_RPC_BASE_PATH": "ipc", "TMPDIR": "tmp"}.items():
        os.environ.setdefault(var, str(ROOT / ".cache" / sub))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    for var, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                       "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
        os.environ.setdefault(var, value)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write `fig` (PNG next to the JSON it plots) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
