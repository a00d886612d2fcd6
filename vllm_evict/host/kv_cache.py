"""KV cache spec + manager that hold a request's pages at its physical length.

The manager is vLLM's FullAttentionManager plus one rule: before each allocation, a request
that evicts keeps only the pages that `EvictionConfig.physical_length` needs and returns the
rest (always the tail: kept tokens are compacted to the front by the workers in the same step).
Allocation then counts physical, not logical, tokens. Requests that never pass their cap behave
exactly as in vLLM, prefix caching included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_evict.core.config import EvictionConfig
from vllm_evict.host.metrics import metrics
from vllm_evict.host.patching import extends
from vllm_evict.kernels.paged import cdiv


@extends(why="full attention whose requests may hold fewer pages than their length")
@dataclass(frozen=True, kw_only=True)
class EvictableAttentionSpec(FullAttentionSpec):
    """Full attention whose requests may hold fewer pages than their length (same layout)."""

    @classmethod
    def from_full(cls, spec: FullAttentionSpec) -> EvictableAttentionSpec:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return cls(**fields)


@extends(why="free the pages past a request's physical length")
class EvictionKVCacheManager(FullAttentionManager):
    # Shared with EvictionScheduler, which fills it on add_request: the requests that will be
    # compacted, with their resolved config. Empty until the scheduler binds it.
    eviction_configs: Mapping[str, EvictionConfig] = {}
    # Only the first eviction group counts, so hybrid models with several groups count once.
    counts_metrics: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evicted: dict[str, int] = {}  # request -> logical minus physical length
        self.pages_freed: dict[str, int] = {}  # request -> pages returned mid-flight

    def physical_tokens(self, request_id: str, num_tokens: int) -> int:
        return num_tokens - self.evicted.get(request_id, 0)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        cfg = self.eviction_configs.get(request_id)
        if cfg is None:
            return
        physical = cfg.physical_length(processed_computed_tokens, num_prompt_tokens or 0)
        evicted = processed_computed_tokens - physical
        newly_evicted = evicted - self.evicted.get(request_id, 0)
        self.evicted[request_id] = evicted
        blocks = self.req_to_blocks.get(request_id)
        keep = cdiv(physical, self.block_size)
        freed = 0
        if blocks is not None and len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(tail))
            freed = len(tail)
            self.pages_freed[request_id] = self.pages_freed.get(request_id, 0) + freed
        if newly_evicted > 0 and self.counts_metrics:
            m = metrics()
            m.compactions.labels(cfg.policy).inc()
            m.tokens_evicted.labels(cfg.policy).inc(newly_evicted)
            m.pages_freed.inc(freed)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, self.physical_tokens(request_id, num_tokens), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id,
            self.physical_tokens(request_id, num_tokens),
            self.physical_tokens(request_id, num_tokens_main_model),
        )

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        # Compaction rewrites a request's pages, so they must never be published by hash.
        if request.request_id in self.eviction_configs:
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str):
        self.evicted.pop(request_id, None)
        self.pages_freed.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_evict.host.patching import record

    record("KVCacheSpecRegistry: EvictableAttentionSpec", "registration",
           "EvictionKVCacheManager caps a request's pages at its physical length")
    KVCacheSpecRegistry.register(EvictableAttentionSpec, EvictionKVCacheManager,
                                 uniform_type_base_spec=FullAttentionSpec)
