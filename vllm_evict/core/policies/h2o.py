"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus the recent window."""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import Policy, SelectionInput, Statistic

ACCUMULATIONS = ("sum", "mean")


@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    summary = "heavy hitters: attention accumulated over every query so far + recent window (H2O)"
    statistic = Statistic.ACCUMULATED_ATTENTION
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"
    accumulation: str = "mean"
    """mean (the default, measured: docs/quality.md): the attention each key received, summed
    over every query so far, divided by the number of queries that could see it (logical
    length - position; kvpress's ObservedAttention). sum: the plain sum of the H2O paper, which
    favours old tokens, since more queries have seen them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {', '.join(ACCUMULATIONS)}; "
                             f"got {self.accumulation!r}")

    def score(self, inp: SelectionInput) -> torch.Tensor:
        scores = super().score(inp)
        if self.accumulation == "mean":
            seen_by = (inp.num_computed_tokens - inp.positions).clamp(min=1)
            scores = scores / seen_by.to(scores.dtype)
        return scores
