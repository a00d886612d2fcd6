"""Statistics for score-based policies, measured on the attention path.

The model runner announces, once per step, which requests need which observation; the
attention wrapper of each layer then measures exactly those, per KV head (summed over its GQA
group), into a float32 score buffer laid out like the page pool ([blocks, block_size,
kv_heads] per layer). Compaction moves scores with their tokens. This module is the CPU (torch)
path; a GPU backend wrapper calls the Triton kernels with the same plan.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field

import torch

from vllm_evict.core.rope import RopeTable
from vllm_evict.kernels.paged import cdiv, gather_paged, paged_index
from vllm_evict.kernels.scoring import attention_probs_reference, window_scores_reference


class Observe(enum.Enum):
    ACCUMULATE = "add every query's attention (h2o; snapkv after prefill)"
    LATEST = "overwrite with the latest query's attention (tova)"
    WINDOW = "sum the attention of the prompt's last queries, pooled at the prompt's end (snapkv)"
    QUERY_MOMENTS = "add the queries, before RoPE, to their running mean and covariance"


@dataclass
class QueryMoments:
    """Running sums of one request's queries before RoPE, per layer and query head, from which
    expected attention takes their mean and covariance. float64: the covariance is
    E[q q^T] - mean mean^T, and queries have large means.

    Decode queries are buffered as they came (rotated) and folded in batches (`defer`): one
    un-rotation and one [D, k] x [k, D] product per layer and head for k queries, where adding
    each step's rank-one update reads and writes the whole float64 outer-product sum, every
    step and every request (measured: docs/results/decode_overhead.json)."""

    total: torch.Tensor | None = None
    """[layers, q_heads, head_dim]"""
    outer: torch.Tensor | None = None
    """[layers, q_heads, head_dim, head_dim]"""
    count: torch.Tensor | None = None
    """[layers] queries added per layer"""
    pending: list[torch.Tensor] = field(default_factory=list)
    """Decode queries not yet folded in, each [layers, q_heads, head_dim], rotated."""
    pending_positions: list[int] = field(default_factory=list)
    rope: RopeTable | None = None

    def defer(self, queries: torch.Tensor, position: int, rope: RopeTable) -> None:
        """queries: [layers, q_heads, head_dim], one decode query per layer, still rotated to
        `position`; folded in with the others once PENDING_QUERIES_LIMIT are buffered, or when
        the moments are read."""
        self.pending.append(queries)
        self.pending_positions.append(position)
        self.rope = rope
        if len(self.pending) >= PENDING_QUERIES_LIMIT:
            self.fold()

    def fold(self) -> None:
        if not self.pending:
            return
        q = torch.stack(self.pending)  # [k, layers, q_heads, D]
        k, layers, heads, dim = q.shape
        positions = torch.tensor(self.pending_positions)
        q = self.rope.unrotate(q.reshape(k, layers * heads, dim), positions)
        self._allocate(layers, heads, dim, q.device)
        self._accumulate(q.view(k, layers, heads, dim), slice(None))
        self.pending, self.pending_positions = [], []

    def _accumulate(self, q: torch.Tensor, layers: slice) -> None:
        """Add q [k, len(layers), q_heads, D], un-rotated, to the sums of `layers`."""
        q = q.double()
        self.total[layers] += q.sum(0)
        self.outer[layers] += torch.einsum("klhi,klhj->lhij", q, q)
        self.count[layers] += q.shape[0]

    def _allocate(self, num_layers: int, heads: int, dim: int, device: torch.device) -> None:
        if self.total is None:
            kw = {"dtype": torch.float64, "device": device}
            self.total = torch.zeros(num_layers, heads, dim, **kw)
            self.outer = torch.zeros(num_layers, heads, dim, dim, **kw)
            self.count = torch.zeros(num_layers, **kw)

    def add(self, layer: int, num_layers: int, queries: torch.Tensor) -> None:
        """queries: [n, q_heads, head_dim], already un-rotated."""
        self._allocate(num_layers, queries.shape[1], queries.shape[2], queries.device)
        self._accumulate(queries[:, None], slice(layer, layer + 1))

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [layers, q_heads, D] and [layers, q_heads, D, D] (population covariance)."""
        self.fold()
        if self.total is None or bool((self.count == 0).any()):
            raise ValueError("no queries were observed")
        n = self.count[:, None, None]
        mean = self.total / n
        cov = self.outer / n[..., None] - mean[..., :, None] * mean[..., None, :]
        return mean.float(), cov.float()


PENDING_QUERIES_LIMIT = 65
"""Deferred decode queries a request buffers before they are folded into its scores anyway.
One more than the default slack, so that with the default only the compaction that reads
them folds them (an earlier fold costs a second pass over every layer's keys). Bounds the
buffer at 65 x layers x q_heads x head_dim per request: 2.2 MB for SmolLM2-135M in bf16,
17 MB for Llama-3.1-8B."""


@dataclass
class PendingQueries:
    """One request's decode queries whose accumulated attention (ACCUMULATE) is not yet in its
    scores. Between two compactions nothing moves a held entry and a query's attention depends
    only on the entries it saw (physical 0 .. length - 1), so measuring them all at once, right
    before the compaction reads the scores (flush_pending_queries), gives what measuring each
    in its own step gives, with one batched product per layer instead of one per step."""

    queries: list[torch.Tensor] = field(default_factory=list)
    """Each [layers, q_heads, head_dim], as the attention layers received them (after RoPE)."""
    lengths: list[int] = field(default_factory=list)
    """Physical length each query saw, its own entry included."""
    scale: float = 1.0

    def __len__(self) -> int:
        return len(self.queries)

    def clear(self) -> None:
        self.queries, self.lengths = [], []


@dataclass
class Observation:
    row: int
    """The request's row in this step's batch."""
    kind: Observe
    window_from: int = 0
    """WINDOW: index, among this step's queries of the request, of the first window query."""
    window_starts: bool = False
    """WINDOW: the window begins in this step (earlier scores are cleared)."""
    window_ends: bool = False
    """WINDOW: the prompt ends in this step (the summed scores are max-pooled)."""
    pool_kernel: int = 1
    first_position: int = 0
    """QUERY_MOMENTS: logical position of this step's first query of the request (RoPE)."""
    moments: QueryMoments | None = None
    """QUERY_MOMENTS: where the request's queries are added, from window_from on."""
    visible: list[torch.Tensor] | None = None
    """Per layer [kv_heads, n] bool: which held entries (physical 0 .. n - 1) attention may see
    (pyramidkv's per-layer budgets; None: all); entries written since (n and later) are always
    visible. The statistics mask the others; unless `backend_hides`, the layer's output is
    recomputed with them masked too."""
    backend_hides: bool = False
    """The hidden entries fill the request's first pages of each layer and the backend's own
    attention skips them (StepPlan.hidden_pages), so its output needs no recompute."""
    private_scores: list[torch.Tensor] | None = None
    """Per layer [capacity, kv_heads] float32, by physical position: the request's own scores
    while its pages may be shared with other requests (prefix caching, before its first
    compaction), where the paged buffer would mix their statistics; None: the paged buffer."""
    pending: PendingQueries | None = None
    """ACCUMULATE on one decode query: buffer the query here instead of measuring it now
    (PendingQueries); None: measure in this step."""


@dataclass
class StepPlan:
    observations: list[Observation]
    score_buffers: list[torch.Tensor]
    layer_of_cache: dict[int, int]
    """data_ptr of a layer's KV cache -> its index in score_buffers."""
    rope: RopeTable | None = None
    """The model's rotary table, for QUERY_MOMENTS."""
    host_layout: tuple[list[int], list[int]] | None = None
    """(query start of every row and the end, physical length of every row), known on the
    host before the forward pass; without it they are read from the attention metadata (a
    device sync on GPU)."""
    derived: dict = field(default_factory=dict)
    """What a backend derives from the plan once per step and reuses in every layer (the GPU
    backend's kernel launches)."""
    kv_views: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer the (K, V) views of its cache (as score_buffers), built once by the runner, so
    the attention wrappers need not build or cache their own; None: they build them."""
    hidden_pages: list[list[int]] | None = None
    """Per layer, per row of the step's batch: how many of the row's first pages that layer's
    attention skips (pyramidkv's hidden entries, stored there); None: none anywhere."""
    scoring_seconds: float = 0.0
    """Time the attention wrappers spent measuring in this step (the scoring metric, counted
    once per step rather than once per layer)."""


logger = logging.getLogger("vllm.evict")
_current: StepPlan | None = None
QUERY_BLOCK = 256


def begin_step(plan: StepPlan | None) -> None:
    global _current
    _current = plan if plan is not None and (plan.observations or plan.hidden_pages) else None


def current_plan() -> StepPlan | None:
    return _current


def host_layout(plan: StepPlan, query_start_loc: torch.Tensor,
                seq_lens: torch.Tensor) -> tuple[list[int], list[int]]:
    """(query starts, physical lengths) of the step's rows, without a sync when the runner
    gave them."""
    if plan.host_layout is None:
        plan.host_layout = (query_start_loc.tolist(), seq_lens.tolist())
    elif not query_start_loc.is_cuda and "layout_checked" not in plan.derived:
        # Free off the GPU: check the runner's host-side layout against the metadata, so the
        # CPU tests cover the layout the GPU path trusts without reading it back.
        plan.derived["layout_checked"] = True
        rows = len(plan.host_layout[1])
        actual = (query_start_loc[: rows + 1].tolist(), seq_lens[:rows].tolist())
        if actual != plan.host_layout:
            if os.environ.get("VLLM_EVICT_STRICT_CHECKS") == "1":  # the test suite
                raise AssertionError(f"host layout {plan.host_layout} != metadata {actual}")
            logger.error("vllm-evict: the step's host layout %s differs from the attention "
                         "metadata %s; using the metadata", plan.host_layout, actual)
            plan.host_layout = actual
    return plan.host_layout


def page_slots(block_row: torch.Tensor, length: int, page_size: int) -> torch.Tensor:
    """Flat slot (page * page_size + offset) of physical positions 0 .. length - 1."""
    page, slot = paged_index(block_row, length, page_size)
    return page * page_size + slot


def observe_layer(plan: StepPlan, kv_cache: torch.Tensor, key_view: torch.Tensor,
                  value_view: torch.Tensor, query: torch.Tensor, output: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  block_table: torch.Tensor, scale: float) -> None:
    """key_view, value_view: [blocks, kv_heads, page_size, D] (see attention/layouts.py);
    query, output: [T, q_heads, D], output as the backend computed it."""
    layer = plan.layer_of_cache.get(kv_cache.data_ptr())
    if layer is None:
        return
    _, kv_heads, page_size, dim = key_view.shape
    scores = plan.score_buffers[layer].view(-1, kv_heads)
    if "decode" not in plan.derived:  # once per step, reused by every layer
        starts, lengths = host_layout(plan, query_start_loc, seq_lens)
        plan.derived["moments"], others = split_moments(plan.observations, starts, plan.rope)
        plan.derived["deferred"], others = split_deferred(others, starts, lengths)
        plan.derived["decode"], plan.derived["each"] = split_decode(
            others, starts, lengths, block_table, page_size)
    decode: DecodeBatch | None = plan.derived["decode"]
    if decode is not None:
        observe_decode_batch(decode, layer, scores, key_view, value_view, query, output, scale)
    moments: MomentsBatch | None = plan.derived.get("moments")
    if moments is not None:
        moments.observe(layer, len(plan.score_buffers), query)
    deferred: DeferredBatch | None = plan.derived.get("deferred")
    if deferred is not None:
        deferred.observe(layer, len(plan.score_buffers), query, scale)
    starts, lengths = host_layout(plan, query_start_loc, seq_lens)
    for ob in plan.derived["each"]:
        first, last, seq = starts[ob.row], starts[ob.row + 1], lengths[ob.row]
        if ob.kind is Observe.QUERY_MOMENTS:
            add_query_moments(plan, ob, layer, query[first:last])
            continue
        pages = block_table[ob.row, : cdiv(seq, page_size)].long()

        hidden = None
        if ob.visible is not None:
            hidden = torch.zeros(kv_heads, seq, dtype=torch.bool, device=query.device)
            layer_visible = ob.visible[layer]
            hidden[:, : layer_visible.shape[1]] = ~layer_visible
        recompute = hidden is not None and not ob.backend_hides
        n = last - first
        # Only the queries the statistic needs, in blocks so a long prefill chunk never builds
        # more than QUERY_BLOCK x S probabilities at once. Masked requests whose backend saw the
        # hidden entries need every query's output recomputed.
        observed = {Observe.LATEST: n - 1, Observe.WINDOW: ob.window_from}.get(ob.kind, 0)
        start = 0 if recompute else observed
        keys = gather_paged(key_view, pages, seq)
        values = gather_paged(value_view, pages, seq).float() if recompute else None
        weights = torch.zeros(kv_heads, seq, dtype=torch.float32, device=query.device)
        for lo in range(start, n, QUERY_BLOCK):
            hi = min(n, lo + QUERY_BLOCK)
            # No query of the block sees past its last query's own entry: the causal cut
            # saves about a quarter of a long prompt's products (half of a one-chunk prompt's).
            seen = seq - n + hi
            probs = attention_probs_reference(
                query[first + lo:first + hi], keys[:, :seen], scale,
                None if hidden is None else hidden[:, :seen], first_position=seq - n + lo)
            if values is not None:
                out = torch.einsum("nhgs,hsd->nhgd", probs, values[:, :seen])
                output[first + lo:first + hi] = out.reshape(hi - lo, -1, dim).to(output.dtype)
            weights[:, :seen] += probs[max(0, observed - lo):].sum(dim=(0, 2))
        if ob.private_scores is not None:
            target, slots = ob.private_scores[layer], torch.arange(seq, device=query.device)
        else:
            target, slots = scores, page_slots(block_table[ob.row], seq, page_size)
        if ob.kind is Observe.LATEST:
            target[slots] = weights.T
            continue
        # ACCUMULATE and WINDOW add to what the held tokens had; new tokens start from zero.
        target[slots if ob.window_starts else slots[seq - n:]] = 0
        target[slots] += weights.T
        if ob.kind is Observe.WINDOW and ob.window_ends:
            target[slots] = window_scores_reference(target[slots].T[None], ob.pool_kernel).T


def add_query_moments(plan: StepPlan, ob: Observation, layer: int, query: torch.Tensor) -> None:
    """Add the request's queries (this step's, from window_from on), un-rotated, to its moments."""
    query = query[ob.window_from:]
    if plan.rope is None or ob.moments is None or query.shape[0] == 0:
        return  # nothing measured: the compaction's policy fails and falls back (logged)
    positions = torch.arange(ob.first_position + ob.window_from,
                             ob.first_position + ob.window_from + query.shape[0])
    ob.moments.add(layer, len(plan.score_buffers), plan.rope.unrotate(query, positions))


@dataclass
class DecodeBatch:
    """The step's one-query ACCUMULATE and LATEST observations (decode), measured together in
    every layer with a few batched tensor ops and no per-request Python: their keys padded to
    the longest, [B, S]."""

    token: torch.Tensor
    """[B] the query's row in the step's query tensor."""
    flat: torch.Tensor
    """[B, S] flat score slot (page * page_size + offset) of every held entry; 0 past the end."""
    valid: torch.Tensor
    """[B, S] bool: the entry exists (S > the request's length is padding)."""
    latest: torch.Tensor
    """[B] bool: LATEST (overwrite) rather than ACCUMULATE (add; the new entry starts at 0)."""
    page: torch.Tensor
    slot: torch.Tensor
    pages: torch.Tensor
    """[B, cdiv(S, page_size)] each row's pages (page 0 past its end), for whole-page gathers."""
    hidden: torch.Tensor | None
    """[layers, B, kv_heads, S] bool: entries attention may not see (pyramidkv); None: all."""
    masked: torch.Tensor | None
    """[B] bool: the rows with hidden entries the backend saw, whose output is recomputed."""
    recompute: bool = False
    """Some row's output is recomputed (known on the host: no device sync)."""


def split_decode(observations: list[Observation], starts: list[int], lengths: list[int],
                 block_table: torch.Tensor, page_size: int
                 ) -> tuple[DecodeBatch | None, list[Observation]]:
    """(the batchable decode observations as one DecodeBatch, the rest one by one); starts
    and lengths: the rows' query starts and physical lengths (host_layout)."""
    batch, rest = [], []
    for ob in observations:
        one_query = starts[ob.row + 1] - starts[ob.row] == 1
        if one_query and ob.kind in (Observe.ACCUMULATE, Observe.LATEST) \
                and ob.private_scores is None:
            batch.append(ob)
        else:
            rest.append(ob)
    if not batch:
        return None, rest
    return decode_batch(batch, starts, lengths, block_table, page_size), rest


def defers(ob: Observation, num_queries: int) -> bool:
    """Whether an observation may buffer its query (PendingQueries) instead of measuring it in
    this step, with no output to recompute (nothing hidden, or hidden by the backend): a plain
    ACCUMULATE of one decode query (folded later into the paged score buffer or, while the
    request's pages may be shared, into its private scores), or LATEST, whose last query the
    next compaction scores itself (latest_query_scores)."""
    if ob.visible is not None and not ob.backend_hides:
        return False
    if ob.kind is Observe.LATEST:
        return True
    return ob.kind is Observe.ACCUMULATE and num_queries == 1 and ob.private_scores is None


def split_deferred(observations: list[Observation], starts: list[int], lengths: list[int]
                   ) -> tuple[DeferredBatch | None, list[Observation]]:
    """(the observations that buffer their query, the rest)."""
    batch = [ob for ob in observations if ob.pending is not None
             and defers(ob, starts[ob.row + 1] - starts[ob.row])]
    if not batch:
        return None, observations
    rest = [ob for ob in observations if all(ob is not b for b in batch)]
    last_rows = torch.tensor([starts[ob.row + 1] - 1 for ob in batch])
    return DeferredBatch(batch, StepQueries(last_rows), [lengths[ob.row] for ob in batch]), rest


KEPT_QUERY_ROWS = 64
"""A step of at most this many query rows keeps each layer's query tensor whole until the end of
the step (StepQueries): one stack and one index then, instead of an index and a copy in
every layer. Longer steps (a prefill chunk among them) copy only the rows they need."""


@dataclass
class StepQueries:
    """One query row per request (`tokens`) from every layer, gathered as [layers, B, q_heads,
    D] at the end of the step. A short step keeps each layer's query tensor as it is (vLLM
    writes nothing to it after the layer's attention) so that the layer loop does no work per
    layer; a long one copies the rows."""

    tokens: torch.Tensor
    """[B] the rows in the step's query tensor."""
    layers: list[torch.Tensor | None] = field(default_factory=list)
    whole: bool = True
    """layers holds whole query tensors (index at the end) rather than the rows."""

    def keep(self, layer: int, num_layers: int, query: torch.Tensor) -> None:
        if not self.layers:
            self.layers = [None] * num_layers
            self.whole = query.shape[0] <= KEPT_QUERY_ROWS
            self.tokens = self.tokens.to(query.device)
        self.layers[layer] = query if self.whole else query[self.tokens]

    def gathered(self) -> torch.Tensor | None:
        """[layers, B, q_heads, D]; a layer the forward never observed reads zeros. None: the
        forward reached no observed layer."""
        seen = next((q for q in self.layers if q is not None), None)
        if seen is None:
            return None
        stacked = torch.stack([q if q is not None else torch.zeros_like(seen)
                               for q in self.layers])
        return stacked[:, self.tokens] if self.whole else stacked


@dataclass
class DeferredBatch:
    """This step's deferred queries (each request's last): kept by every layer (StepQueries)
    and handed to each request at the end of the step (finish_step)."""

    observations: list[Observation]
    queries: StepQueries
    lengths: list[int]
    scale: float = 1.0

    def observe(self, layer: int, num_layers: int, query: torch.Tensor, scale: float) -> None:
        self.queries.keep(layer, num_layers, query)
        self.scale = scale

    def finish(self) -> None:
        buffer = self.queries.gathered()
        if buffer is None:
            return  # the forward never reached an observed layer
        for b, ob in enumerate(self.observations):
            if ob.kind is Observe.LATEST:
                ob.pending.clear()  # only the latest query counts
            ob.pending.queries.append(buffer[:, b])
            ob.pending.lengths.append(self.lengths[b])
            ob.pending.scale = self.scale


def flush_pending_queries(pending: PendingQueries, score_buffers: list[torch.Tensor],
                          key_views: list[torch.Tensor], block_row: torch.Tensor,
                          page_size: int, private: list[torch.Tensor] | None = None,
                          visible: list[torch.Tensor] | None = None) -> None:
    """Add the buffered queries' attention to the request's scores (the paged buffer at its
    pages in block_row, or `private`, per layer [capacity, kv_heads] by physical position,
    while its pages may be shared) and empty the buffer: per layer one product of all of them
    against the entries the longest saw, each query masked to its own length and, with
    `visible` (per layer [kv_heads, n], as in Observation), to what attention saw. Each
    query's own entry starts from zero, as in observe_decode_batch."""
    if not pending.queries:
        return
    device = key_views[0].device
    queries = torch.stack(pending.queries).to(device)  # [k, layers, q_heads, D]
    lengths = torch.tensor(pending.lengths, device=device)
    longest = max(pending.lengths)
    k, kv_heads, dim = queries.shape[0], key_views[0].shape[1], key_views[0].shape[3]
    pages = block_row[: cdiv(longest, page_size)].long()
    slots = (page_slots(block_row, longest, page_size) if private is None
             else torch.arange(longest, device=device))
    unseen = torch.arange(longest, device=device)[None, :] >= lengths[:, None]  # [k, S]
    # Each query's mask as an additive bias, broadcast over heads and group: scaling, masking
    # and the product are then one baddbmm per layer.
    group = queries.shape[2] // kv_heads
    bias = torch.zeros(k, longest, device=device).masked_fill_(unseen, float("-inf"))
    bias = bias[:, None, :].expand(k, group, longest).reshape(1, k * group, longest)
    own = slots[lengths - 1]
    for layer, key_view in enumerate(key_views):
        keys = gather_paged(key_view, pages, longest).float()  # [kv_heads, S, D]
        q = queries[:, layer].float().view(k, kv_heads, group, dim).transpose(0, 1)
        logits = torch.baddbmm(bias, q.reshape(kv_heads, k * group, dim), keys.transpose(1, 2),
                               alpha=pending.scale).view(kv_heads, k, group, longest)
        if visible is not None:
            shown = visible[layer].to(device)
            logits[..., : shown.shape[1]].masked_fill_(~shown[:, None, None, :], float("-inf"))
        target = score_buffers[layer].view(-1, kv_heads) if private is None else private[layer]
        target[own] = 0
        target[slots] += torch.softmax(logits, -1).sum(dim=(1, 2)).T
    pending.clear()


def latest_query_scores(pending: PendingQueries, key_views: list[torch.Tensor],
                        block_row: torch.Tensor, length: int) -> torch.Tensor:
    """[layers, kv_heads, length] float32: the buffered last query's attention over the
    request's held entries (physical 0 .. length - 1), summed over each KV head's queries:
    what LATEST would have written to the scores in that query's own step. Scored here, at
    the compaction that reads it, so the step before a compaction (a prompt's last chunk, for
    a first compaction) does no attention of its own; nothing moved a held entry in between."""
    query = pending.queries[-1].to(key_views[0].device)  # [layers, q_heads, D]
    seen = min(pending.lengths[-1], length)  # entries written after it stay at 0
    out = torch.zeros(len(key_views), key_views[0].shape[1], length, device=query.device)
    for layer, key_view in enumerate(key_views):
        keys = gather_paged(key_view, block_row, seen)
        probs = attention_probs_reference(query[layer][None], keys, pending.scale)
        out[layer, :, :seen] = probs[0].sum(dim=1)
    return out


def split_moments(observations: list[Observation], starts: list[int], rope: RopeTable | None
                  ) -> tuple[MomentsBatch | None, list[Observation]]:
    """(the one-query QUERY_MOMENTS observations past their skipped queries as a MomentsBatch,
    the rest)."""
    batch = [ob for ob in observations if ob.kind is Observe.QUERY_MOMENTS and ob.window_from == 0
             and starts[ob.row + 1] - starts[ob.row] == 1 and ob.moments is not None]
    if not batch or rope is None:
        return None, observations
    rest = [ob for ob in observations if all(ob is not b for b in batch)]
    rows = StepQueries(torch.tensor([starts[ob.row] for ob in batch]))
    return MomentsBatch(batch, rows, torch.tensor([ob.first_position for ob in batch]), rope), rest


@dataclass
class MomentsBatch:
    """Decode-step query moments (expected attention) for many requests: kept by every layer
    (StepQueries) and handed to each request at the end of the step (finish_step;
    QueryMoments.defer folds them in later, in batches), so the layer loop has no
    per-request work."""

    observations: list[Observation]
    queries: StepQueries
    positions: torch.Tensor
    """[B] each query's logical position (RoPE)."""
    rope: RopeTable

    def observe(self, layer: int, num_layers: int, query: torch.Tensor) -> None:
        self.queries.keep(layer, num_layers, query)

    def finish(self) -> None:
        buffer = self.queries.gathered()  # rotated, as the layers received them
        if buffer is None:
            return  # the forward never reached an observed layer
        for b, (ob, position) in enumerate(zip(self.observations, self.positions.tolist(),
                                               strict=True)):
            ob.moments.defer(buffer[:, b], position, self.rope)


def finish_step(plan: StepPlan | None) -> None:
    """After the forward pass: fold what the layers buffered into the requests' statistics
    (also in the sub-plans a backend derived, such as the GPU backend's torch-path plan)."""
    if plan is None:
        return
    if plan.derived.get("moments") is not None:
        plan.derived["moments"].finish()
    if plan.derived.get("deferred") is not None:
        plan.derived["deferred"].finish()
    for value in plan.derived.values():
        if isinstance(value, StepPlan):
            finish_step(value)


def decode_batch(batch: list[Observation], starts: list[int], lengths: list[int],
                 block_table: torch.Tensor, page_size: int) -> DecodeBatch:
    device = block_table.device
    rows = torch.tensor([ob.row for ob in batch], device=device)
    seqs = torch.tensor([lengths[ob.row] for ob in batch], device=device)
    longest = max(lengths[ob.row] for ob in batch)  # from the host: no device sync
    pos = torch.arange(longest, device=device)
    valid = pos[None, :] < seqs[:, None]
    page = block_table[rows][:, pos // page_size].long()  # [B, S]; padding reads page row 0
    slot = (pos % page_size).expand(len(batch), -1)
    page = torch.where(valid, page, torch.zeros_like(page))
    pages = page[:, ::page_size]  # the first slot of every page is valid wherever its page is
    hidden = masked = None
    if any(ob.visible is not None for ob in batch):
        masked = torch.tensor([ob.visible is not None and not ob.backend_hides for ob in batch],
                              device=device)
        num_layers = next(len(ob.visible) for ob in batch if ob.visible is not None)
        kv_heads = next(ob.visible for ob in batch if ob.visible is not None)[0].shape[0]
        hidden = torch.zeros(num_layers, len(batch), kv_heads, longest, dtype=torch.bool,
                             device=device)
        for b, ob in enumerate(batch):  # once per step, not per layer
            if ob.visible is not None:
                held = ob.visible[0].shape[1]
                hidden[:, b, :, :held] = ~torch.stack(ob.visible)
    return DecodeBatch(
        token=torch.tensor([starts[ob.row + 1] - 1 for ob in batch], device=device),
        flat=page * page_size + slot, valid=valid,
        latest=torch.tensor([ob.kind is Observe.LATEST for ob in batch], device=device),
        page=page, slot=slot, pages=pages, hidden=hidden, masked=masked,
        recompute=any(ob.visible is not None and not ob.backend_hides for ob in batch))


def gather_batch(view: torch.Tensor, batch: DecodeBatch, rows: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """float32 [B, S, kv_heads, D]: the batch's held entries of `view` (or of its `rows`).
    Whole pages with one index_select for tensor views (several times faster on CPU than
    indexing every (page, slot) pair through the transposed K view); padding past a row's
    length reads page 0 and is masked by the caller."""
    longest = batch.valid.shape[1]
    if isinstance(view, torch.Tensor):
        pages = batch.pages if rows is None else batch.pages[rows]
        b, p = pages.shape
        tiles = view.index_select(0, pages.reshape(-1))  # [b * p, kv_heads, page, D]
        tiles = tiles.view(b, p, *tiles.shape[1:]).transpose(2, 3)  # [b, p, page, kv, D]
        return tiles.reshape(b, -1, *tiles.shape[3:])[:, :longest].float()
    page, slot = (batch.page, batch.slot) if rows is None else (batch.page[rows], batch.slot[rows])
    return view[page, :, slot].float()  # MappedPagedView


def observe_decode_batch(batch: DecodeBatch, layer: int, scores: torch.Tensor,
                         key_view: torch.Tensor, value_view: torch.Tensor, query: torch.Tensor,
                         output: torch.Tensor, scale: float) -> None:
    """One layer's statistics for a DecodeBatch; scores: the layer's buffer as [slots, kv_heads]."""
    _, kv_heads, _, dim = key_view.shape
    keys = gather_batch(key_view, batch)  # [B, S, kv_heads, D]
    q = query[batch.token].float()  # [B, q_heads, D]
    b = q.shape[0]
    q = q.view(b, kv_heads, -1, dim)
    logits = torch.einsum("bhgd,bshd->bhgs", q, keys) * scale
    masked = ~batch.valid[:, None, None, :]
    if batch.hidden is not None:
        masked = masked | batch.hidden[layer][:, :, None, :]
    probs = torch.softmax(logits.masked_fill(masked, float("-inf")), dim=-1)
    if batch.recompute:
        # recompute the output of the rows the backend did not hide from, over the visible entries
        rows = batch.masked
        values = gather_batch(value_view, batch, rows)
        out = torch.einsum("bhgs,bshd->bhgd", probs[rows], values).reshape(-1, q.shape[1] * q.shape[2], dim)
        output[batch.token[rows]] = out.to(output.dtype)
    weights = probs.sum(dim=2).transpose(1, 2)  # [B, S, kv_heads]
    flat, valid = batch.flat[batch.valid], weights[batch.valid]  # [N], [N, kv_heads]
    latest = batch.latest[:, None].expand_as(batch.valid)[batch.valid]
    # LATEST overwrites; ACCUMULATE adds, its new entry (the last) starting from zero.
    newest = batch.valid & ~torch.nn.functional.pad(batch.valid[:, 1:], (0, 1), value=False)
    fresh = batch.flat[newest & ~batch.latest[:, None]]
    scores[fresh] = 0
    scores[flat[latest]] = valid[latest]
    scores.index_put_((flat[~latest],), valid[~latest], accumulate=True)
