"""Policy registry: built-ins plus third-party policies from the `vllm_evict.policies` entry points.

Like vLLM's attention-backend registry, a name maps to a class path that is imported on first
use, so listing names (for `--help` and validation) imports no policy code.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import typing
from importlib.metadata import entry_points

from vllm_evict.core.policies.base import Policy

logger = logging.getLogger("vllm.evict")

ENTRY_POINT_GROUP = "vllm_evict.policies"
NO_EVICTION = "none"
"""The policy name that means: keep every token (vanilla vLLM)."""

_BUILTIN: dict[str, str] = {
    "streaming": "vllm_evict.core.policies.streaming:StreamingPolicy",
    "h2o": "vllm_evict.core.policies.h2o:H2OPolicy",
    "tova": "vllm_evict.core.policies.tova:TOVAPolicy",
    "snapkv": "vllm_evict.core.policies.snapkv:SnapKVPolicy",
    "pyramidkv": "vllm_evict.core.policies.pyramidkv:PyramidKVPolicy",
    "keydiff": "vllm_evict.core.policies.keydiff:KeyDiffPolicy",
    "knorm": "vllm_evict.core.policies.knorm:KnormPolicy",
    "random": "vllm_evict.core.policies.random:RandomPolicy",
    "expected_attention": "vllm_evict.core.policies.expected_attention:ExpectedAttentionPolicy",
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


def check_policy_args(name: str, args: object) -> dict:
    """`args` for policy `name`'s dataclass fields, type-checked; ValueError otherwise."""
    if not isinstance(args, dict):
        raise ValueError(f"{name}: expected a mapping of its parameters; got {args!r}")
    policy = get_policy_class(name)
    hints = typing.get_type_hints(policy)
    fields = {f.name: hints.get(f.name, object) for f in dataclasses.fields(policy) if f.init}
    for key, value in args.items():
        if key not in fields:
            raise ValueError(f"{name}: unknown parameter {key!r}; {name} has "
                             f"{', '.join(sorted(fields)) or 'no parameters'}")
        want = fields[key]
        ok = (isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
              if isinstance(want, type) else True)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"{name}.{key}: must be {want.__name__}; got {value!r}")
    try:
        policy(**args)
    except Exception as exc:  # the policy's own checks (__post_init__)
        raise ValueError(f"{name}: {exc}") from None
    return dict(args)


def policy_summaries() -> dict[str, str]:
    """One line per policy, for `--help`."""
    out = {NO_EVICTION: "keep every token (vanilla vLLM); requests may still opt in"}
    for name in available_policies()[1:]:
        try:
            out[name] = get_policy_class(name).summary
        except Exception as exc:  # a broken third-party policy must not break --help
            out[name] = f"(failed to load: {exc})"
    return out
