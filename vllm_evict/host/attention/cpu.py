"""The CPU attention backend with statistics: vLLM's CPU_ATTN, then the torch statistics.

Registered over CPU_ATTN by EvictionCPUWorker (so only engines with eviction use it); on CPU the
platform always picks CPU_ATTN, and it honours registered overrides.
"""

from __future__ import annotations

import os

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_evict.core import observation as stats
from vllm_evict.host.attention.layouts import LAYOUT_ENV, cpu_views
from vllm_evict.host.attention.observing import ObservingImpl, observing_backend, register_over


class EvictionCPUAttentionImpl(ObservingImpl, CPUAttentionBackendImpl):
    @staticmethod
    def kv_views(layer, kv_cache):
        # Built once per layer and cache tensor, kept on the layer (which holds the cache): every
        # observed layer asks in every step, and building them (checks on the probed layout)
        # cost more than a decode step's deferred statistics.
        key = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), layer.isa,
               os.environ.get(LAYOUT_ENV))
        cached = getattr(layer, "_eviction_kv_views", None)
        if cached is None or cached[0] != key:
            cached = layer._eviction_kv_views = (key, cpu_views(kv_cache, layer.isa))
        return cached[1]
    observe_layer = staticmethod(stats.observe_layer)


EvictionCPUAttentionBackend = observing_backend(CPUAttentionBackend, EvictionCPUAttentionImpl)


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register_over(AttentionBackendEnum.CPU_ATTN, EvictionCPUAttentionBackend)
