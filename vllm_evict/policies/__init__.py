"""Eviction policies: one file each, behind the Policy interface in base.py."""

from vllm_evict.policies.base import Policy, SelectionInput, SelectWhen, Statistic
from vllm_evict.policies.registry import (
    available_policies,
    get_policy_class,
    policy_summaries,
    register_policy,
)

__all__ = [
    "Policy",
    "SelectionInput",
    "SelectWhen",
    "Statistic",
    "available_policies",
    "get_policy_class",
    "policy_summaries",
    "register_policy",
]
