"""The CPU attention backend with statistics: vLLM's CPU_ATTN, then the torch statistics.

Registered over CPU_ATTN by EvictionCPUWorker (so only engines with eviction use it); on CPU the
platform always picks CPU_ATTN, and it honours registered overrides.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_evict.core import observation as stats
from vllm_evict.host.attention.layouts import cpu_views
from vllm_evict.host.attention.observing import ObservingImpl, observing_backend, register_over


class EvictionCPUAttentionImpl(ObservingImpl, CPUAttentionBackendImpl):
    @staticmethod
    def kv_views(layer, kv_cache):
        return cpu_views(kv_cache, layer.isa)  # the ISA vLLM's builder chose for this layer
    observe_layer = staticmethod(stats.observe_layer)


EvictionCPUAttentionBackend = observing_backend(CPUAttentionBackend, EvictionCPUAttentionImpl)


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register_over(AttentionBackendEnum.CPU_ATTN, EvictionCPUAttentionBackend)
