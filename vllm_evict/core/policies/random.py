"""Random baseline: seeded, so a run is reproducible."""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import Policy, SelectionInput


@dataclass
class RandomPolicy(Policy):
    name = "random"
    summary = "baseline: uniformly random tokens (seeded by the logical length)"
    seed: int = 0

    def score(self, inp: SelectionInput) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + inp.num_computed_tokens)
        return torch.rand(inp.positions.shape, generator=generator)
