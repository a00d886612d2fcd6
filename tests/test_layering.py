"""The layering rule: the core and the kernels never import vLLM, not even transitively.
Only vllm_evict/host does (ruff's banned-api rule checks the same statically)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

_BLOCK_VLLM = """
import importlib, importlib.abc, sys

class NoVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"vLLM imported: {name}")
        return None

sys.meta_path.insert(0, NoVllm())
for module in sys.argv[1:]:
    importlib.import_module(module)
print("ok", len(sys.argv) - 1)
"""


def _modules(package: str, folder: str) -> list[str]:
    """Every module under `folder`, named as installed under `package`."""
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((package, *parts)))
    return names


def _import_without_vllm(modules: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_VLLM, *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_core_and_kernels_import_without_vllm():
    modules = _modules("vllm_evict.core", "vllm_evict/core") + [
        m for m in _modules("vllm_evict.kernels", "kernels") if m != "vllm_evict.kernels.aot_check"]
    assert len(modules) > 20
    proc = _import_without_vllm(["vllm_evict", *modules])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(modules) + 1}"


def test_the_blocker_catches_the_adapter():
    """Negative control: the adapter does import vLLM, so the same check must fail on it."""
    proc = _import_without_vllm(["vllm_evict.host.scheduler"])
    assert proc.returncode != 0 and "vLLM imported" in proc.stderr


def test_every_vllm_touch_is_recorded_and_listed_by_doctor():
    proc = subprocess.run([sys.executable, "-m", "vllm_evict", "--doctor"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for target in ("EngineArgs.from_cli_args", "EngineArgs.create_engine_config",
                   "InputProcessor._validate_params", "Attention.get_kv_cache_spec",
                   "register_custom_kv_cache_specs", "AttentionBackendEnum.CPU_ATTN",
                   "sched.scheduler.Scheduler", "FullAttentionManager", "CPUWorker"):
        assert target in out, out
    assert "(supported: 0.32.x)" in out


def test_patching_is_idempotent_and_refuses_other_vllm_versions(monkeypatch):
    import pytest

    from vllm_evict.host import patching

    class Target:
        def greet(self) -> str:
            return "hi"

        @staticmethod
        def double(x: int) -> int:
            return 2 * x

    def wrap(original):
        return lambda self: original(self) + "!"

    assert patching.patch(Target, "greet", wrap, why="test")
    assert not patching.patch(Target, "greet", wrap, why="test")  # once only
    assert Target().greet() == "hi!"
    assert patching.patch(Target, "double", lambda f: (lambda x: f(x) + 1), why="test")
    assert Target.double(3) == 7  # still a staticmethod
    monkeypatch.setattr(patching, "vllm_version", lambda: "0.33.0")
    with pytest.raises(patching.UnsupportedVllmError, match="supports vLLM 0.32.x; this is vLLM 0.33.0"):
        patching.check_vllm_version()
