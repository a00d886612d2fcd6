"""Policy registry: built-ins plus third-party policies from the `vllm_evict.policies` entry points.

Like vLLM's attention-backend registry, a name maps to a class path that is imported on first
use, so listing names (for `--help` and validation) imports no policy code.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from vllm_evict.config import NO_EVICTION
from vllm_evict.policies.base import Policy

logger = logging.getLogger("vllm.evict")

ENTRY_POINT_GROUP = "vllm_evict.policies"

_BUILTIN: dict[str, str] = {
    "streaming": "vllm_evict.policies.streaming:StreamingPolicy",
    "h2o": "vllm_evict.policies.h2o:H2OPolicy",
    "tova": "vllm_evict.policies.tova:TOVAPolicy",
    "snapkv": "vllm_evict.policies.snapkv:SnapKVPolicy",
    "pyramidkv": "vllm_evict.policies.pyramidkv:PyramidKVPolicy",
    "keydiff": "vllm_evict.policies.keydiff:KeyDiffPolicy",
    "knorm": "vllm_evict.policies.knorm:KnormPolicy",
    "random": "vllm_evict.policies.random:RandomPolicy",
}
_registry: dict[str, str | type[Policy]] = dict(_BUILTIN)
_entry_points_loaded = False


def register_policy(name: str, policy: str | type[Policy]) -> None:
    """Register a policy class (or "module:Class" path) under `name`."""
    if name == NO_EVICTION:
        raise ValueError(f"{NO_EVICTION!r} is reserved: it means no eviction")
    _registry[name] = policy


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _registry:
            logger.warning("vllm-evict: entry point %s ignored: policy %r exists", ep.value, ep.name)
            continue
        _registry[ep.name] = ep.value.replace(" ", "")


def available_policies() -> list[str]:
    """Every accepted `--kv-eviction` value, "none" first."""
    _load_entry_points()
    return [NO_EVICTION, *sorted(_registry)]


def get_policy_class(name: str) -> type[Policy]:
    _load_entry_points()
    if name not in _registry:
        raise KeyError(f"unknown policy {name!r}; allowed: {', '.join(available_policies())}")
    target = _registry[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _registry[name] = target
    return target


def policy_summaries() -> dict[str, str]:
    """One line per policy, for `--help`."""
    out = {NO_EVICTION: "keep every token (vanilla vLLM); requests may still opt in"}
    for name in available_policies()[1:]:
        try:
            out[name] = get_policy_class(name).summary
        except Exception as exc:  # a broken third-party policy must not break --help
            out[name] = f"(failed to load: {exc})"
    return out
