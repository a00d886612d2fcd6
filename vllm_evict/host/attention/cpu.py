"""The CPU attention backend with statistics: vLLM's CPU_ATTN, then the torch statistics.

Registered over CPU_ATTN by EvictionCPUWorker (so only engines with eviction use it); on CPU the
platform always picks CPU_ATTN, and it honours registered overrides.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
)

from vllm_evict.core import observation as stats
from vllm_evict.host.attention.layouts import cpu_views
from vllm_evict.host.attention.observing import ObservingImpl, observing_backend, register_over
from vllm_evict.host.patching import extends


@extends(why="start each layer's attention past the pages that hold its hidden entries")
class HiddenPagesCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, started past each row's hidden pages in this layer.

    pyramidkv hides entries per layer; the compaction stores them in the request's first pages
    (core/state.py, hidden_first), so the layer's attention over the rest is vLLM's own kernel
    with the block-table row shifted by those pages and the length cut by as many entries. No
    mask and no recompute: the step costs what snapkv's does."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        plan = stats.current_plan()
        if plan is not None and plan.hidden_pages is not None and attn_metadata is not None:
            index = plan.layer_of_cache.get(kv_cache.data_ptr())
            if index is not None and any(plan.hidden_pages[index]):
                attn_metadata = self._past_hidden_pages(plan, plan.hidden_pages[index],
                                                        attn_metadata, kv_cache, layer,
                                                        query.dtype)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                               *args, **kwargs)

    def _past_hidden_pages(self, plan: stats.StepPlan, skips: list[int],
                           metadata: CPUAttentionMetadata, kv_cache: torch.Tensor, layer,
                           dtype: torch.dtype) -> CPUAttentionMetadata:
        """The step's metadata with every row's first `skips[row]` pages left out; built once
        per step for each distinct set of skips (layers with the same budget share it)."""
        key = ("hidden_pages", tuple(skips))
        if key not in plan.derived:
            rows, page_size = len(skips), kv_cache.shape[2]
            table = metadata.block_table
            shift = torch.tensor(skips, dtype=torch.int64, device=table.device)
            columns = torch.arange(table.shape[1], device=table.device)
            index = (columns[None, :] + shift[:, None]).clamp_(max=table.shape[1] - 1)
            shifted = table.clone()
            shifted[:rows] = table[:rows].gather(1, index)
            seq_lens = metadata.seq_lens.clone()
            seq_lens[:rows] -= (shift * page_size).to(seq_lens.dtype)
            num_reqs = metadata.query_start_loc.shape[0] - 1
            # The kernel's work split follows the lengths: rebuild it as the builder does.
            scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=num_reqs, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size, seq_lens=seq_lens, dtype=dtype,
                query_start_loc=metadata.query_start_loc, causal=metadata.causal,
                sliding_window_size=self.sliding_window, isa=layer.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=metadata.dynamic_causal, kv_cache_dtype=self.kv_cache_dtype)
            plan.derived[key] = dataclasses.replace(
                metadata, block_table=shifted, seq_lens=seq_lens,
                scheduler_metadata=scheduler_metadata)
        return plan.derived[key]


class EvictionCPUAttentionImpl(ObservingImpl, HiddenPagesCPUAttentionImpl):
    # The runner passes every layer's views, built once, with the step's plan; these build
    # them where a plan has none.
    kv_views = staticmethod(lambda layer, kv_cache: cpu_views(kv_cache, layer.isa))
    observe_layer = staticmethod(stats.observe_layer)


EvictionCPUAttentionBackend = observing_backend(CPUAttentionBackend, EvictionCPUAttentionImpl)


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register_over(AttentionBackendEnum.CPU_ATTN, EvictionCPUAttentionBackend)
