"""Eviction policies: one file each, behind the Policy interface in base.py."""

from vllm_evict.core.policies.base import (
    Policy,
    SelectionError,
    SelectionInput,
    Statistic,
    check_selection,
    fallback_selection,
)
from vllm_evict.core.policies.registry import (
    available_policies,
    get_policy_class,
    policy_summaries,
    register_policy,
)

__all__ = [
    "Policy",
    "SelectionError",
    "SelectionInput",
    "Statistic",
    "available_policies",
    "check_selection",
    "fallback_selection",
    "get_policy_class",
    "policy_summaries",
    "register_policy",
]
