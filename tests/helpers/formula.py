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


def expected_pages_freed(cfg: EvictionConfig, prompt: int, max_tokens: int, page: int) -> int:
    """Pages the scheduler returns mid-flight for that request: at each step boundary it holds
    the pages of the previous step's physical length plus the token computed since, and keeps
    cdiv(P(c), page) of them."""
    def pages(n: int) -> int:
        return -(-n // page)

    freed, held = 0, pages(prompt)
    for c in range(prompt, prompt + max_tokens - 1):
        physical = cfg.physical_length(c, prompt)
        freed += max(0, held - pages(physical))
        held = pages(physical + 1)  # this step's token
    return freed
