"""KV cache spec + manager that hold a request's pages at its physical length.

The manager is vLLM's FullAttentionManager plus two rules for a request that evicts:
- Before each allocation it keeps only the pages that `EvictionConfig.physical_length` needs
  and returns the rest (always the tail: kept tokens are compacted to the front by the workers
  in the same step). Allocation then counts physical, not logical, tokens.
- Copy on write, with prefix caching on. Until its first compaction the request's pages hold
  exactly vanilla's KV, so it reads and publishes prefix-cache pages like any request. Its first
  compaction writes to fresh private pages: they are allocated first and lead this step's new
  page ids, and every page held before goes back to the pool (a cached page stays cached,
  untouched). When the pool is short of fresh pages, pages only this request holds are taken
  out of the cache and reused among them. The workers apply the same rule (runner.py): the
  first new page ids are the destination, whatever they are, so no message is needed. Pages
  allocated later are private and never published, so later compactions work in place.
Requests that never pass their cap behave exactly as in vLLM.
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

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """What one request can hold. vLLM's start-up check that one max_model_len fits in the
        pool uses this: on a server that bounds every request (EvictionConfig.bounded_length)
        the bound must fit instead, so a pool smaller than one max_model_len can start."""
        cfg = EvictionConfig.from_additional_config(vllm_config.additional_config)
        bound = cfg.bounded_length if cfg is not None else None
        full = super().max_memory_usage_bytes(vllm_config)
        if bound is None:
            return full
        return min(full, (cdiv(bound, self.block_size) + 1) * self.page_size_bytes)


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
        # request -> fresh pages its first compaction writes to (allocated with this step's)
        self.pending_copy_on_write: dict[str, int] = {}
        # request -> of those, pages it reuses from its own (the pool was short)
        self.pending_reuse: dict[str, int] = {}

    def copies_on_write(self, request_id: str, num_prompt_tokens: int) -> bool:
        """With prefix caching, a request's pages may be shared until its first compaction,
        unless it keeps out of the cache (EvictionConfig.shares_pages: then it neither reads
        nor publishes it)."""
        cfg = self.eviction_configs.get(request_id)
        return self.enable_caching and (cfg is None or cfg.shares_pages(num_prompt_tokens))

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
        before = self.evicted.get(request_id, 0)
        newly_evicted = evicted - before
        self.evicted[request_id] = evicted
        keep = cdiv(physical, self.block_size)
        shared = self.copies_on_write(request_id, num_prompt_tokens or 0)
        if shared and request_id in self.pending_copy_on_write:
            # A retry in the same step (allocation failed, something was preempted): the same
            # boundary, still pending.
            self.pending_copy_on_write[request_id] = keep
            return
        if shared and before == 0 and evicted > 0:
            # The first compaction: its pages may be in the prefix cache or shared with other
            # requests. They are released in allocate_new_blocks, once the fresh pages exist
            # (so a fresh page is never one the compaction still reads).
            self.pending_copy_on_write[request_id] = keep
            return  # counted once the fresh pages exist (allocate_new_blocks)
        blocks = self.req_to_blocks.get(request_id)
        freed = 0
        if blocks is not None and len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(tail))
            freed = len(tail)
            self.pages_freed[request_id] = self.pages_freed.get(request_id, 0) + freed
        self._count(cfg, newly_evicted, freed)

    def _count(self, cfg: EvictionConfig, newly_evicted: int, freed: int) -> None:
        if self.counts_metrics and (newly_evicted > 0 or freed > 0):
            m = metrics()
            if newly_evicted > 0:
                m.compactions.labels(cfg.policy).inc()
                m.tokens_evicted.labels(cfg.policy).inc(newly_evicted)
            m.pages_freed.inc(freed)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        cfg = self.eviction_configs.get(request_id)
        if cfg is not None and kwargs.get("apply_admission_cap"):
            # Admission (vLLM's whole-prompt-must-fit check): a prefill-evicting request never
            # holds more than its peak.
            num_tokens = cfg.peak_length(num_tokens)
        if request_id in self.pending_copy_on_write:
            # Every page of the compacted layout is new (the held ones are freed afterwards),
            # unless the pool is short: then pages only this request holds are reused.
            needed = cdiv(self.physical_tokens(request_id, num_tokens), self.block_size)
            reuse = self._pages_to_reuse(request_id, needed,
                                         self.pending_copy_on_write[request_id])
            self.pending_reuse[request_id] = reuse
            return needed - reuse
        return super().get_num_blocks_to_allocate(
            request_id, self.physical_tokens(request_id, num_tokens), *args, **kwargs)

    @staticmethod
    def _exclusive_pages(held: list) -> list:
        """The held pages no other request holds (the prefix cache may still list them)."""
        return [page for page in held if page.ref_cnt == 1 and not page.is_null]

    def _pages_to_reuse(self, request_id: str, needed: int, count: int) -> int:
        """How many of its own pages a first compaction that needs `needed` new pages reuses:
        none while the pool has them (its pages stay cached for other requests), else what
        is missing, up to the pages only it holds (so a request whose prompt fills the pool
        compacts in place instead of preempting itself at every step)."""
        short = needed - self.block_pool.get_num_free_blocks()
        if short <= 0:
            return 0
        return min(short, count,
                   len(self._exclusive_pages(self.req_to_blocks.get(request_id, []))))

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        fresh = []
        if request_id in self.pending_copy_on_write:
            count = self.pending_copy_on_write.pop(request_id)
            held = self.req_to_blocks[request_id]
            # The pool was short (get_num_blocks_to_allocate): the first pages only this
            # request holds take compacted entries too, taken out of the prefix cache. The
            # workers gather every kept entry before writing any, so a page may be both.
            reuse = max(self.pending_reuse.pop(request_id, 0),
                        self._pages_to_reuse(request_id, count, count))
            reused = self._exclusive_pages(held)[:reuse]
            for page in reused:
                self.block_pool._maybe_evict_cached_block(page)
            # Not recorded for worker-side zeroing: the compaction writes every slot of these.
            fresh = reused + self.block_pool.get_new_blocks(count - len(reused))
            reused_ids = {page.block_id for page in reused}
            self.req_to_blocks[request_id] = list(fresh)
            self.num_cached_block[request_id] = 0  # nothing of the new layout is published
            self.block_pool.free_blocks(reversed([p for p in held if p.block_id not in reused_ids]))
            freed = len(held) - len(fresh)
            self.pages_freed[request_id] = self.pages_freed.get(request_id, 0) + freed
            cfg = self.eviction_configs.get(request_id)
            if cfg is not None:
                self._count(cfg, self.evicted.get(request_id, 0), max(freed, 0))
        new = super().allocate_new_blocks(
            request_id,
            self.physical_tokens(request_id, num_tokens),
            self.physical_tokens(request_id, num_tokens_main_model),
        )
        return fresh + new if fresh else new

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        # Until its first compaction an evicting request's pages hold vanilla's KV, so they are
        # published like any request's (its prompt included); after it they never are.
        rid = request.request_id
        if rid in self.eviction_configs and (
                not self.copies_on_write(rid, request.num_prompt_tokens)
                or self.evicted.get(rid, 0) > 0
                or rid in self.pending_copy_on_write):
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str):
        self.evicted.pop(request_id, None)
        self.pages_freed.pop(request_id, None)
        self.pending_copy_on_write.pop(request_id, None)
        self.pending_reuse.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_evict.host.patching import record

    record("KVCacheSpecRegistry: EvictableAttentionSpec", "registration",
           "EvictionKVCacheManager caps a request's pages at its physical length")
    KVCacheSpecRegistry.register(EvictableAttentionSpec, EvictionKVCacheManager,
                                 uniform_type_base_spec=FullAttentionSpec)
