"""The one thing every eviction attention backend adds to vLLM's: after the layer's attention,
measure what this step's plan asks for (see stats.py). Backends differ only in how they view
their KV cache and in which implementation measures (torch on CPU, Triton kernels on GPU)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from vllm_evict.core import observation as stats

KvViews = Callable[[object, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(layer, kv_cache) -> (K, V) views [blocks, kv_heads, page_size, head_dim]."""


class ObservingImpl:
    """Mixed in front of a vLLM AttentionImpl; subclasses set `kv_views` and `observe_layer`."""

    kv_views: KvViews
    observe_layer: Callable[..., None]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 *args, **kwargs)
        plan = stats.current_plan()
        if plan is not None and attn_metadata is not None:
            started = time.perf_counter()  # on GPU: launch time (the kernels run async)
            n = attn_metadata.num_actual_tokens
            index = plan.layer_of_cache.get(kv_cache.data_ptr())
            if plan.kv_views is not None and index is not None:
                key_view, value_view = plan.kv_views[index]
            else:
                key_view, value_view = type(self).kv_views(layer, kv_cache)
            type(self).observe_layer(
                plan, kv_cache, key_view, value_view,
                query[:n].view(n, self.num_heads, self.head_size),
                output[:n].view(n, self.num_heads, self.head_size),
                attn_metadata.query_start_loc, attn_metadata.seq_lens,
                attn_metadata.block_table, self.scale)
            plan.scoring_seconds += time.perf_counter() - started  # counted once per step
        return output


def observing_backend(backend: type, impl: type) -> type:
    """vLLM's attention `backend` with `impl` as its implementation. Everything else, the name
    included (vLLM compares backend names in places), is inherited. Named after the module-level
    name the caller binds it to, so vLLM's registry can import it by path."""
    from vllm_evict.host.patching import extends

    extends(why="vLLM's attention, then the statistics this step's plan asks for")(impl)
    return extends(why="the same backend with the statistics impl")(
        type(f"Eviction{backend.__name__}", (backend,),
             {"get_impl_cls": staticmethod(lambda: impl), "__module__": impl.__module__}))


def register_over(member, backend: type) -> None:
    """Register `backend` (from observing_backend) in place of vLLM's backend `member`."""
    from vllm.v1.attention.backends.registry import register_backend

    from vllm_evict.host.patching import record

    register_backend(member, f"{backend.__module__}.{backend.__name__}")
    record(f"AttentionBackendEnum.{member.name}", "registration",
           f"{backend.__name__}: vLLM's backend, then the eviction statistics")
