"""PyramidKV (Cai et al., 2024): SnapKV scores with budgets that shrink layer by layer.

Every (layer, KV head) holds the same number of entries (the plugin's one-length rule), so the
pyramid is realised by masking: all layers hold `budget` entries selected by SnapKV scores, and
layer l's attention sees only its `layer_budget(l)` best, from `budget` at the first layer down
to budget / beta at the last. Memory is that of snapkv at the same budget: the pyramid changes
what attention sees, not what is stored. (Real savings would need one vLLM KV cache group per
budget level, each with its own block table.)
"""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import SelectionInput
from vllm_evict.core.policies.snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"
    summary = ("snapkv scores; per-layer budgets shrink linearly from --kv-budget (first layer) "
               "to budget/20 (last), by masking (PyramidKV)")
    beta: int = 20

    def layer_budgets(self, inp: SelectionInput, num_layers: int) -> list[int]:
        cfg = inp.config
        low = max(cfg.smallest_budget, cfg.budget // self.beta)
        high = max(cfg.budget, low)
        if num_layers == 1:
            return [high]
        step = (high - low) / (num_layers - 1)
        return [round(high - i * step) for i in range(num_layers)]

    def visible(self, inp: SelectionInput, keep: torch.Tensor) -> torch.Tensor:
        scores = self.selection_scores(inp).gather(-1, keep)  # [layers, heads, target]
        shown = torch.zeros_like(keep, dtype=torch.bool)
        for layer, budget in enumerate(self.layer_budgets(inp, keep.shape[0])):
            best = torch.topk(scores[layer], min(budget, keep.shape[-1]), dim=-1).indices
            shown[layer].scatter_(-1, best, True)
        return shown
