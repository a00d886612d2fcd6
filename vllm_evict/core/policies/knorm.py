"""Key-norm baseline (Devoto et al., 2024): keep the keys with the smallest L2 norm."""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import Policy, SelectionInput, Statistic
from vllm_evict.kernels.scoring import knorm_scores_reference


@dataclass
class KnormPolicy(Policy):
    name = "knorm"
    summary = "baseline: keep the keys with the smallest L2 norm"
    statistic = Statistic.KEYS
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"

    def score(self, inp: SelectionInput) -> torch.Tensor:
        return torch.stack([knorm_scores_reference(layer_keys) for layer_keys in inp.keys])
