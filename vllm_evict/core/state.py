"""What a worker remembers about one request that may be compacted."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.observation import PendingQueries, QueryMoments
from vllm_evict.core.policies import Policy

logger = logging.getLogger("vllm.evict")


@dataclass
class RequestEvictionState:
    config: EvictionConfig
    policy: Policy = field(init=False)
    evicted: int = 0
    """Logical minus physical length: the one number the data path needs."""
    kept_positions: torch.Tensor | None = None
    """[layers, kv_heads, P] logical positions held right after the last compaction."""
    positions_known_until: int = 0
    """Logical length at the last compaction; later tokens were appended in order."""
    visible: list[torch.Tensor] | None = None
    """Per layer [kv_heads, P] bool: held entries attention may see (None: all; pyramidkv's
    per-layer budgets hide the rest)."""
    hidden_pages: list[int] | None = None
    """Per layer, how many of the request's first pages hold its hidden entries, which that
    layer's attention skips (hidden_first); None: hidden entries, if any, are masked instead."""
    policy_failed: bool = False
    """The policy raised or returned a malformed selection once (logged once per request)."""
    may_evict: bool = True
    """False when prompt + max_tokens never passes the cap: no statistics are measured."""
    shares_pages: bool = True
    """It takes part in the prefix cache (EvictionConfig.shares_pages; the scheduler's twin)."""
    query_moments: QueryMoments = field(default_factory=QueryMoments)
    """Running query statistics (expected attention); empty for other policies."""
    pending_queries: PendingQueries = field(default_factory=PendingQueries)
    """Decode queries (ACCUMULATE) measured at the next compaction, not in their own step."""
    private_scores: list[torch.Tensor] | None = None
    """Per layer [capacity, kv_heads] float32 attention statistic by physical position, used
    instead of the paged buffer while the request's pages may be shared (prefix caching, until
    its first compaction moves the kept scores to its private pages)."""

    def __post_init__(self) -> None:
        try:
            self.policy = self.config.build_policy()
        except Exception as exc:  # a third-party policy that cannot even be built
            from vllm_evict.core.policies.streaming import StreamingPolicy

            logger.error("vllm-evict: policy %r could not be built (%s: %s); this request keeps "
                         "sinks + recent tokens", self.config.policy, type(exc).__name__, exc)
            self.policy, self.policy_failed = StreamingPolicy(), True

    def reset(self) -> None:
        """Preempted: vLLM recomputes the request from scratch, so start over."""
        self.evicted = 0
        self.kept_positions = None
        self.positions_known_until = 0
        self.visible = None
        self.hidden_pages = None
        self.query_moments = QueryMoments()
        self.pending_queries = PendingQueries()
        self.private_scores = None

    def private_scores_for(self, length: int, layers: int, heads: int,
                           device: torch.device) -> list[torch.Tensor]:
        """The private score buffers, grown (doubling, contents kept) to hold `length`."""
        current = self.private_scores
        if current is not None and current[0].shape[0] >= length:
            return current
        capacity = max(length, 2 * current[0].shape[0] if current is not None else 0)
        grown = [torch.zeros(capacity, heads, dtype=torch.float32, device=device)
                 for _ in range(layers)]
        if current is not None:
            for new, old in zip(grown, current, strict=True):
                new[: old.shape[0]] = old
        self.private_scores = grown
        return grown

    def visible_positions(self) -> list[list[list[int]]]:
        """[layer][kv_head] logical positions attention sees, as of the last compaction."""
        kept = self.kept_positions
        if self.visible is None:
            return kept.tolist()
        return [[row[mask].tolist() for row, mask in zip(layer, visible, strict=True)]
                for layer, visible in zip(kept, self.visible, strict=True)]

    def compacts_within(self, num_computed_tokens: int, num_scheduled_tokens: int,
                        num_prompt_tokens: int) -> bool:
        """Whether a step boundary after this step (num_computed + 1 .. + num_scheduled: with
        drafts, fewer tokens than scheduled may be accepted) compacts the request."""
        cfg, held_before = self.config, num_computed_tokens - self.evicted
        return any(cfg.physical_length(b, num_prompt_tokens) < held_before + (b - num_computed_tokens)
                   for b in range(num_computed_tokens + 1,
                                  num_computed_tokens + num_scheduled_tokens + 1))

    def held_positions(self, num_computed_tokens: int, layers: int, heads: int) -> torch.Tensor:
        """[layers, heads, held] logical position of every physical slot in use."""
        device = self.kept_positions.device if self.kept_positions is not None else None
        appended = torch.arange(self.positions_known_until, num_computed_tokens,
                                dtype=torch.int64, device=device)
        appended = appended.expand(layers, heads, -1)
        if self.kept_positions is None:
            return appended.clone()
        return torch.cat([self.kept_positions, appended], dim=-1)

    def record_compaction(self, kept_positions: torch.Tensor, num_computed_tokens: int,
                          visible: torch.Tensor | None = None,
                          hidden_pages: list[int] | None = None) -> None:
        self.visible = None if visible is None else list(visible)
        self.hidden_pages = hidden_pages
        self.kept_positions = kept_positions
        self.positions_known_until = num_computed_tokens
        self.evicted = num_computed_tokens - kept_positions.shape[-1]


def hidden_first(keep: torch.Tensor, visible: torch.Tensor, page_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """Order a selection so that each layer's hidden entries fill its first pages: (keep,
    visible) reordered, hidden first, each part in logical order, and per layer the number of
    pages they fill. A backend that starts the layer's attention after those pages needs no
    mask. Where a layer hides different counts in different KV heads, or not whole pages, the
    selection is returned as it was, with None (its output is recomputed with a mask)."""
    hidden = (~visible).sum(-1)  # [layers, kv_heads]
    per_layer = hidden[:, 0]
    if not bool((hidden == per_layer[:, None]).all()) or bool((per_layer % page_size).any()):
        return keep, visible, None
    order = torch.sort(visible.to(torch.int8), dim=-1, stable=True).indices  # hidden (0) first
    return (keep.gather(-1, order), visible.gather(-1, order),
            (per_layer // page_size).tolist())
