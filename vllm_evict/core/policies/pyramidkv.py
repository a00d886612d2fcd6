"""PyramidKV (Cai et al., 2024): SnapKV scores with budgets that shrink layer by layer.

Every (layer, KV head) holds the same number of entries (the plugin's one-length rule), so the
pyramid is realised by hiding: all layers hold `budget` entries selected by SnapKV scores, and
layer l's attention sees only its `layer_budget(l)` best, from `budget` at the first layer down
to budget / beta at the last. Each layer hides a whole number of pages (its budget rounded to
the page size), so the CPU backend stores the hidden entries in the request's first pages and
its attention starts after them: no extra work per step. Memory is that of snapkv at the same
budget: the pyramid changes what attention sees, not what is stored. (Real savings would need
one vLLM KV cache group per budget level, each with its own block table.)
"""

from dataclasses import dataclass

import torch

from vllm_evict.core.policies.base import SelectionInput
from vllm_evict.core.policies.snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"
    summary = ("snapkv scores; per-layer budgets shrink linearly from --kv-budget (first layer) "
               "to budget/20 (last), in whole pages, by hiding entries from attention (PyramidKV)")
    beta: int = 20

    def layer_budgets(self, inp: SelectionInput, num_layers: int, target: int | None = None
                      ) -> list[int]:
        """Entries each layer sees out of `target` held (default: the budget). Layer l hides
        budget - ramp(l), the ramp falling linearly from the budget to budget / beta, rounded
        to whole pages (and never so many that fewer than the smallest budget stay); entries
        held past the budget (the slack, at a compaction inside the cycle) stay visible."""
        cfg = inp.config
        target = cfg.budget if target is None else target
        page = max(1, getattr(inp, "page_size", 1))
        low = max(cfg.smallest_budget, cfg.budget // self.beta)
        high = max(cfg.budget, low)
        step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
        most_hidden = max(0, target - cfg.smallest_budget) // page * page
        return [target - min(most_hidden, round((high - round(high - i * step)) / page) * page)
                for i in range(num_layers)]

    def visible(self, inp: SelectionInput, keep: torch.Tensor) -> torch.Tensor:
        scores = self.selection_scores(inp).gather(-1, keep)  # [layers, heads, target]
        shown = torch.zeros_like(keep, dtype=torch.bool)
        for layer, budget in enumerate(self.layer_budgets(inp, keep.shape[0], keep.shape[-1])):
            best = torch.topk(scores[layer], budget, dim=-1).indices
            shown[layer].scatter_(-1, best, True)
        return shown
