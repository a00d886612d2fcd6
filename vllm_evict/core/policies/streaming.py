"""StreamingLLM (Xiao et al., 2023): attention sinks plus the most recent tokens."""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import Policy, SelectionInput


@dataclass
class StreamingPolicy(Policy):
    name = "streaming"
    summary = "attention sinks + most recent tokens (StreamingLLM); needs no statistics"

    def score(self, inp: SelectionInput) -> torch.Tensor:
        # Recency is the score, so after the sinks the newest tokens fill the budget.
        return inp.positions.to(torch.float32)
