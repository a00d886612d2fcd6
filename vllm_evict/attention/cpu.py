"""The CPU attention backend with statistics: vLLM's CPU_ATTN plus `observe_layer` after it.

Registered over CPU_ATTN by EvictionCPUWorker (so only engines with eviction use it); on CPU the
platform always picks CPU_ATTN, and it honours registered overrides.
"""

from __future__ import annotations

import time

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_evict.attention import stats
from vllm_evict.attention.layouts import cpu_views
from vllm_evict.metrics import metrics


class EvictionCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 *args, **kwargs)
        plan = stats.current_plan()
        if plan is not None and attn_metadata is not None:
            started = time.perf_counter()
            n = attn_metadata.num_actual_tokens
            key_view, value_view = cpu_views(kv_cache)
            stats.observe_layer(plan, kv_cache, key_view, value_view,
                                query[:n].view(n, self.num_heads, self.head_size),
                                output[:n].view(n, self.num_heads, self.head_size),
                                attn_metadata.query_start_loc, attn_metadata.seq_lens,
                                attn_metadata.block_table, self.scale)
            metrics().scoring_seconds.inc(time.perf_counter() - started)
        return output


class EvictionCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # vLLM compares backend names in places

    @staticmethod
    def get_impl_cls():
        return EvictionCPUAttentionImpl


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN,
                     f"{EvictionCPUAttentionBackend.__module__}.{EvictionCPUAttentionBackend.__name__}")
