"""What the length formula predicts for one request, step boundary by step boundary."""

from __future__ import annotations

from vllm_evict.core.config import EvictionConfig


def expected_eviction(cfg: EvictionConfig, prompt: int, max_tokens: int) -> tuple[int, int]:
    """(compactions, evicted tokens at the end) of a request served without preemption: its
    step boundaries have c = prompt .. prompt + max_tokens - 2 computed tokens."""
    compactions = evicted = 0
    for c in range(prompt, prompt + max_tokens - 1):
        target = cfg.physical_length(c, prompt)
        if c - evicted > target:
            compactions += 1
            evicted = c - target
    return compactions, evicted
