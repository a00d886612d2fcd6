"""GPU attention backends with statistics: vLLM's FLASH_ATTN and TRITON_ATTN, then the Triton
scoring kernels of kernels/ over the same paged cache.

Registered over both by EvictionGPUWorker (so only engines with eviction use them). vLLM's
piecewise CUDA graphs leave attention out of the captured pieces, so this hook runs eagerly
every step; vllm_evict.host.cli keeps CUDA graphs piecewise (no full-graph decode) for engines with
eviction. Compaction runs in the model runner's _update_states, outside any graph.

One step's observations are grouped into one launch per kernel configuration, computed once
per step (on the first layer) and reused by every layer:
  LATEST (tova)       the request's last query, scores overwritten;
  ACCUMULATE (h2o, snapkv after its prompt)
                      every query of the step, added to the held scores (new positions from 0);
  WINDOW (snapkv/pyramidkv prompt window)
                      the window's queries in this chunk; overwrite when the window starts in
                      it, accumulate otherwise; max-pooled in the chunk where the prompt ends.
A launch whose requests each bring one query (decode) uses the decode kernel, others the
window kernel. The rest (needs_torch_path) take the torch path of core/observation.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from vllm_evict.core import observation as stats
from vllm_evict.host.attention.layouts import gpu_views
from vllm_evict.host.attention.observing import ObservingImpl, observing_backend, register_over


@dataclass
class Launch:
    """One kernel launch covering several requests of the step."""

    mode: str  # "accumulate" | "overwrite"
    pool_kernel: int
    token_index: torch.Tensor  # [T'] int64: the observed queries' rows in the step's query
    query_start: torch.Tensor  # [B' + 1] int32, into the gathered queries
    rows: torch.Tensor  # [B'] int64: the requests' rows in the batch
    fresh: torch.Tensor  # [B'] int32: newest positions that start from zero (accumulate)
    max_queries: int
    max_seq_len: int


def plan_launches(observations: list[stats.Observation], starts: list[int], lengths: list[int],
                  device: torch.device) -> list[Launch]:
    """Group the observations (without hidden entries) into launches; starts and lengths come
    from the host (stats.host_layout), so the forward pass never waits for the device."""
    groups: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {}
    for ob in observations:
        first, last = starts[ob.row], starts[ob.row + 1]
        n = last - first
        if ob.kind is stats.Observe.LATEST:
            key, lo = ("overwrite", 1), last - 1
        elif ob.kind is stats.Observe.ACCUMULATE:
            key, lo = ("accumulate", 1), first
        else:
            key = ("overwrite" if ob.window_starts else "accumulate",
                   ob.pool_kernel if ob.window_ends else 1)
            lo = first + ob.window_from
        groups.setdefault(key, []).append((ob.row, lo, last, n))
    launches = []
    for (mode, pool_kernel), members in groups.items():
        counts = [hi - lo for _, lo, hi, _ in members]
        token_index = torch.cat([torch.arange(lo, hi) for _, lo, hi, _ in members])
        query_start = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        launches.append(Launch(
            mode=mode, pool_kernel=pool_kernel, token_index=token_index.to(device),
            query_start=query_start.to(device),
            rows=torch.tensor([row for row, *_ in members], dtype=torch.int64, device=device),
            fresh=torch.tensor([n for *_, n in members], dtype=torch.int32, device=device),
            max_queries=max(counts), max_seq_len=max(lengths[row] for row, *_ in members)))
    return launches


def needs_torch_path(ob: stats.Observation) -> bool:
    """Hidden entries (the output is recomputed with a mask), query moments (expected
    attention: batched matmuls, no attention weights) and private scores (a request whose pages
    may be shared, until its first compaction) take the torch path of core/observation.py."""
    return (ob.visible is not None or ob.kind is stats.Observe.QUERY_MOMENTS
            or ob.private_scores is not None)


def observe_layer(plan: stats.StepPlan, kv_cache: torch.Tensor, key_view: torch.Tensor,
                  value_view: torch.Tensor, query: torch.Tensor, output: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  block_table: torch.Tensor, scale: float) -> None:
    """stats.observe_layer's contract, measured with the Triton kernels."""
    from vllm_evict.kernels.triton_decode_scores import decode_scores
    from vllm_evict.kernels.triton_window_scores import window_scores

    layer = plan.layer_of_cache.get(kv_cache.data_ptr())
    if layer is None:
        return
    if "launches" not in plan.derived:
        masked = [ob for ob in plan.observations if needs_torch_path(ob)]
        plain = [ob for ob in plan.observations if not needs_torch_path(ob)]
        layout = stats.host_layout(plan, query_start_loc, seq_lens)
        plan.derived["masked"] = stats.StepPlan(masked, plan.score_buffers, plan.layer_of_cache,
                                                rope=plan.rope, host_layout=layout)
        plan.derived["launches"] = (plan_launches(plain, *layout, query_start_loc.device)
                                    if plain else [])
    masked: stats.StepPlan = plan.derived["masked"]
    if masked.observations:
        stats.observe_layer(masked, kv_cache, key_view, value_view, query, output,
                            query_start_loc, seq_lens, block_table, scale)
    scores = plan.score_buffers[layer].permute(0, 2, 1)  # [blocks, kv_heads, page]
    for launch in plan.derived["launches"]:
        queries = query.index_select(0, launch.token_index)
        table = block_table.index_select(0, launch.rows)
        lens = seq_lens.index_select(0, launch.rows).to(torch.int32)
        if launch.max_queries == 1 and launch.pool_kernel == 1:
            decode_scores(queries, key_view, table, lens, scale, scores, launch.mode,
                          max_seq_len=launch.max_seq_len)
        else:
            window_scores(queries, launch.query_start, key_view, table, lens, scale, scores,
                          launch.mode, launch.pool_kernel, fresh=launch.fresh,
                          max_queries=launch.max_queries, max_seq_len=launch.max_seq_len)


class EvictionFlashAttentionImpl(ObservingImpl, FlashAttentionImpl):
    kv_views = staticmethod(lambda layer, kv_cache: gpu_views(kv_cache))
    observe_layer = staticmethod(observe_layer)


class EvictionTritonAttentionImpl(ObservingImpl, TritonAttentionImpl):
    kv_views = staticmethod(lambda layer, kv_cache: gpu_views(kv_cache))
    observe_layer = staticmethod(observe_layer)


EvictionFlashAttentionBackend = observing_backend(FlashAttentionBackend,
                                                  EvictionFlashAttentionImpl)
EvictionTritonAttentionBackend = observing_backend(TritonAttentionBackend,
                                                   EvictionTritonAttentionImpl)


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register_over(AttentionBackendEnum.FLASH_ATTN, EvictionFlashAttentionBackend)
    register_over(AttentionBackendEnum.TRITON_ATTN, EvictionTritonAttentionBackend)
