"""KeyDiff (Park et al., 2025): keep the keys least similar to the mean key; no attention."""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import Policy, SelectionInput, Statistic
from vllm_evict.kernels.scoring import keydiff_scores_reference


@dataclass
class KeyDiffPolicy(Policy):
    name = "keydiff"
    summary = "cosine distance of each key from the mean key; needs no attention (KeyDiff)"
    statistic = Statistic.KEYS
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"

    def score(self, inp: SelectionInput) -> torch.Tensor:
        return torch.stack([keydiff_scores_reference(layer_keys) for layer_keys in inp.keys])
