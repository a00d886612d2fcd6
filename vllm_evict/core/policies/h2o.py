"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus the recent window."""

from dataclasses import dataclass

import torch

from vllm_evict.core.observation import Observation, Observe
from vllm_evict.core.policies.base import Policy, SelectionInput, Statistic

ACCUMULATIONS = ("sum", "mean")


@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    summary = "heavy hitters: attention accumulated over every query so far + recent window (H2O)"
    statistic = Statistic.ACCUMULATED_ATTENTION
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"
    accumulation: str = "sum"
    """sum: the attention each key received, summed over every query so far (the H2O paper);
    it favours old tokens, which more queries have seen. mean: that sum divided by the number
    of queries that could see the key (logical length - position; kvpress's ObservedAttention)."""
    late_queries: int = 0
    """The prompt's last `late_queries` queries (those nearest the question) count
    `late_weight` times in the sum; 0 turns this off."""
    late_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {', '.join(ACCUMULATIONS)}; "
                             f"got {self.accumulation!r}")
        if self.late_queries < 0 or self.late_weight < 0:
            raise ValueError("late_queries and late_weight must be >= 0")

    def observation(self, row: int, num_computed_tokens: int, num_scheduled_tokens: int,
                    num_prompt_tokens: int) -> Observation | None:
        late_start = num_prompt_tokens - self.late_queries
        end = num_computed_tokens + num_scheduled_tokens
        if self.late_queries and self.late_weight != 1.0 and \
                num_computed_tokens < num_prompt_tokens and end > late_start:
            return Observation(row, Observe.ACCUMULATE, window_from=max(0, late_start - num_computed_tokens),
                               window_weight=self.late_weight,
                               window_until=num_prompt_tokens - num_computed_tokens)
        return Observation(row, Observe.ACCUMULATE)

    def score(self, inp: SelectionInput) -> torch.Tensor:
        scores = super().score(inp)
        if self.accumulation == "mean":
            seen_by = (inp.num_computed_tokens - inp.positions).clamp(min=1)
            scores = scores / seen_by.to(scores.dtype)
        return scores
