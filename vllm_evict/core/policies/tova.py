"""TOVA (Oren et al., 2024): keep the tokens the latest query attends to most."""

from dataclasses import dataclass

from vllm_evict.core.policies.base import Policy, Statistic


@dataclass
class TOVAPolicy(Policy):
    name = "tova"
    summary = "token omission via attention: the latest query's attention, one set per layer (TOVA)"
    statistic = Statistic.LATEST_QUERY_ATTENTION
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"
