"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus the recent window."""

from dataclasses import dataclass

from vllm_evict.core.policies.base import Policy, Statistic


@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    summary = "heavy hitters: attention accumulated over every query so far + recent window (H2O)"
    statistic = Statistic.ACCUMULATED_ATTENTION
