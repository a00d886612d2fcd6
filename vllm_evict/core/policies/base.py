"""The Policy interface: a policy scores the tokens a request holds; the base class selects.

A policy is a small dataclass with a `score()` method, one per file. Higher scores are kept.
Its fields are its parameters (`--kv-policy-args`); each needs a default, as `heads` has one.
Selection is the same for every policy: the sink tokens and the recent window are always kept,
then the highest scores fill the budget, with the same count in every (layer, KV head), and the
kept tokens stay in logical order. `heads` says whether each KV head chooses its own tokens or
all KV heads of a layer keep one set, chosen by their mean score; either way the memory layout
is the same.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from vllm_evict.core.observation import Observation, Observe, QueryMoments
from vllm_evict.core.rope import RopeTable

if TYPE_CHECKING:  # the config imports the registry, which imports this module
    from vllm_evict.core.config import EvictionConfig


class Statistic(enum.Enum):
    """What a policy needs measured on the attention path to score tokens."""

    NONE = "none"
    KEYS = "keys"
    LATEST_QUERY_ATTENTION = "latest_query_attention"
    ACCUMULATED_ATTENTION = "accumulated_attention"
    PREFILL_WINDOW_ATTENTION = "prefill_window_attention"
    QUERY_MOMENTS = "query_moments"
    """Mean and covariance of the queries before RoPE, plus the held keys and values."""


@dataclass
class SelectionInput:
    """What a policy sees about one request at a compaction.

    positions: [layers, kv_heads, P] logical position of every held entry (physical order).
    scores: [layers, kv_heads, P] float32 attention statistic, for policies that measure one.
    keys: [layers, kv_heads, P, head_dim] held keys, for Statistic.KEYS and QUERY_MOMENTS.
    values, query_moments, rope: held values, the request's query statistics and the model's
        rotary table, for Statistic.QUERY_MOMENTS.
    page_size: entries per page of the cache; a policy that hides entries from attention
        (`visible`) hides whole pages' worth per layer, so the backend can skip them.
    """

    request_id: str
    positions: torch.Tensor
    num_computed_tokens: int
    target_length: int
    config: EvictionConfig
    scores: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    query_moments: QueryMoments | None = None
    rope: RopeTable | None = None
    page_size: int = 1


HEAD_MODES = ("per_head", "shared")
"""per_head: each (layer, KV head) keeps its own top scores. shared: every KV head of a layer
keeps the same tokens, ranked by the score averaged over the layer's KV heads (kvpress's
convention for its attention presses), so a multi-token value is kept whole or not at all."""


@dataclass
class Policy:
    name: ClassVar[str]
    summary: ClassVar[str]
    statistic: ClassVar[Statistic] = Statistic.NONE
    heads: str = "per_head"
    """One of HEAD_MODES; each policy's default is the measured better one (docs/quality.md)."""
    segments: ClassVar[Callable[[int, int], tuple[int, int]] | None] = None
    """Set per instance by EvictionConfig.build_policy (not a policy argument)."""

    def __post_init__(self) -> None:
        if self.heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {', '.join(HEAD_MODES)}; got {self.heads!r}")

    def observation(self, row: int, num_computed_tokens: int, num_scheduled_tokens: int,
                    num_prompt_tokens: int) -> Observation | None:
        """What the attention wrapper measures for this request in a step that computes
        `num_scheduled_tokens` after `num_computed_tokens` (its row in the batch: `row`).
        The default follows `statistic`; policies with their own rule (snapkv) override it."""
        if self.statistic is Statistic.ACCUMULATED_ATTENTION:
            return Observation(row, Observe.ACCUMULATE)
        if self.statistic is Statistic.LATEST_QUERY_ATTENTION:
            return Observation(row, Observe.LATEST)
        return None  # NONE and KEYS need nothing on the attention path; QUERY_MOMENTS overrides

    def prefill_segment(self, num_computed_tokens: int, num_prompt_tokens: int) -> tuple[int, int]:
        """[start, end) of the prefill segment that holds the next token: the span between two
        prefill compaction points with prefill eviction, else the whole prompt. Segment-window
        statistics (snapkv's last queries) end at `end`. The config binds its own rule
        (EvictionConfig.build_policy)."""
        if self.segments is not None:
            return self.segments(num_computed_tokens, num_prompt_tokens)
        return 0, num_prompt_tokens

    def prompt_queries_read(self, num_prompt_tokens: int) -> int | None:
        """How many of the prompt's last queries this policy's statistics read; None: all of
        them. A prefix-cache hit skips computing its tokens' queries, so an evicting request
        reads the cache only up to `prompt - this` (none at all for None), and a cached request
        selects exactly what a cold one does. The last prompt token is always computed, which
        covers the latest-query and key statistics."""
        if self.statistic in (Statistic.ACCUMULATED_ATTENTION, Statistic.QUERY_MOMENTS):
            return None
        return 0

    def score(self, inp: SelectionInput) -> torch.Tensor:
        """[layers, kv_heads, P] scores; higher is kept. By default the measured statistic."""
        if inp.scores is None:
            raise ValueError(f"policy {self.name!r} needs {self.statistic.value} scores")
        return inp.scores

    def ranked_scores(self, inp: SelectionInput) -> torch.Tensor:
        """Scores with the sink tokens and the recent window raised to +inf (always kept)."""
        scores = self.score(inp).to(torch.float32).clone()
        cfg = inp.config
        protected = (inp.positions < cfg.sink_tokens) | (
            inp.positions >= inp.num_computed_tokens - cfg.window
        )
        scores[protected] = float("inf")
        return scores

    def selection_scores(self, inp: SelectionInput) -> torch.Tensor:
        """ranked_scores(), averaged over each layer's KV heads when heads == "shared" (then
        every row of a layer is the same; the held positions are too, since every compaction
        of the request kept one set per layer)."""
        scores = self.ranked_scores(inp)
        if self.heads == "shared":
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        return scores

    def select(self, inp: SelectionInput) -> torch.Tensor:
        """[layers, kv_heads, target] physical indices to keep, ascending in every row."""
        scores = self.selection_scores(inp)
        if self.heads == "shared":  # one top-k per layer, repeated for every KV head
            kept = torch.topk(scores[:, :1], inp.target_length, dim=-1, sorted=False).indices
            return kept.sort(dim=-1).values.expand(-1, scores.shape[1], -1).contiguous()
        kept = torch.topk(scores, inp.target_length, dim=-1, sorted=False).indices
        return kept.sort(dim=-1).values

    def visible(self, inp: SelectionInput, keep: torch.Tensor) -> torch.Tensor | None:
        """[layers, kv_heads, target] bool: which kept entries attention may see. None (the
        default) means all of them; a policy with per-layer budgets hides the rest. Hiding the
        same multiple of `page_size` in every KV head of a layer lets the CPU backend skip
        those pages instead of recomputing the layer's attention (runner: hidden pages)."""
        return None


class SelectionError(ValueError):
    """A policy returned a selection the compaction cannot apply."""


def check_selection(inp: SelectionInput, keep: object, visible: object) -> None:
    """Raise SelectionError unless `keep` is [layers, kv_heads, target] int64 physical indices,
    strictly ascending in every row and within the held entries, and `visible` is None or a
    bool mask of the same shape. Third-party policies are checked before anything moves."""
    want = (*inp.positions.shape[:2], inp.target_length)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.int64 or tuple(keep.shape) != want:
        got = (f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor)
               else type(keep).__name__)
        raise SelectionError(f"select() must return int64 {want}; got {got}")
    held = inp.positions.shape[-1]
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= held):
        raise SelectionError(f"select() returned indices outside [0, {held})")
    if keep.shape[-1] > 1 and not bool((keep[..., 1:] > keep[..., :-1]).all()):
        raise SelectionError("select() must return strictly ascending indices in every row")
    if visible is not None and (not isinstance(visible, torch.Tensor)
                                or visible.dtype != torch.bool or tuple(visible.shape) != want):
        raise SelectionError(f"visible() must return None or a bool {want} mask")


def fallback_selection(inp: SelectionInput) -> torch.Tensor:
    """What a compaction keeps when its policy fails: the sink tokens, then the most recent
    tokens (StreamingLLM), which needs no statistic and always fits the budget."""
    recency = inp.positions.to(torch.float32)
    protected = inp.positions < inp.config.sink_tokens
    recency[protected] = float("inf")
    kept = torch.topk(recency, inp.target_length, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values
