"""EvictionScheduler: vLLM's scheduler plus each request's resolved eviction config.

It resolves the config of every new request (server default + `vllm_xargs`) and shares the
requests that will be compacted with the KV cache managers, which then cap their pages. Such
requests publish their prompt pages and read cached ones (copy on write, kv_cache.py), except
that a cache hit never covers a prompt query the policy reads (EvictionConfig.prefix_hit_limit):
a cached request selects exactly what a cold one does. Requests compacted during their prompt
(prefill eviction) keep out of the cache (EvictionConfig.shares_pages).

A request that prefill eviction bounds (EvictionConfig.peak_length) keeps the pages it may
still grow into reserved: a new or preempted request is admitted only into what is left, so
bounded requests never preempt one another (vLLM's own check covers only the prompt).
"""

from __future__ import annotations

import logging

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.dump import PageTrace
from vllm_evict.host.kv_cache import EvictionKVCacheManager
from vllm_evict.host.metrics import metrics
from vllm_evict.host.patching import extends, record
from vllm_evict.kernels.paged import cdiv

logger = logging.getLogger("vllm.evict")


@extends(why="resolve each request's eviction config and share it with the KV managers")
class EvictionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eviction_default = EvictionConfig.from_additional_config(
            self.vllm_config.additional_config) or EvictionConfig()
        self.eviction_configs: dict[str, EvictionConfig] = {}
        self.prefix_hit_limits: dict[str, int] = {}  # request -> most tokens a hit may cover
        self.eviction_managers = [
            m for m in self.kv_cache_manager.coordinator.single_type_managers
            if isinstance(m, EvictionKVCacheManager)
        ]
        if not self.eviction_managers:
            raise RuntimeError(
                "vllm-evict: no KV cache group uses EvictableAttentionSpec; the model's attention "
                "layers are not supported (only full attention is)."
            )
        for manager in self.eviction_managers:
            manager.eviction_configs = self.eviction_configs
        self.eviction_managers[0].counts_metrics = True
        # Prefill eviction stops an evicting request's prefill chunk at its next compaction
        # point; vLLM's one per-request chunk hook is the Mamba block-aligned split.
        self._vanilla_aligned_split = self.need_mamba_block_aligned_split
        if self.eviction_default.prefill_eviction:  # a server setting; requests cannot set it
            self.need_mamba_block_aligned_split = True
            self._install_growth_reserve()
        self.page_trace = PageTrace.from_env()
        logger.info("vllm-evict scheduler ready: %s", self.eviction_default.describe())

    def _install_growth_reserve(self) -> None:
        """Admissions (waiting or preempted requests) keep the growth of the running bounded
        requests free, through vLLM's admission watermark, which both its checks (the whole
        prompt, then this chunk) add to what the request needs."""
        manager = self.kv_cache_manager
        vanilla_allocate = manager.allocate_slots
        vanilla_watermark = manager.watermark_blocks

        def allocate_slots(request, *args, **kwargs):
            if request.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                return vanilla_allocate(request, *args, **kwargs)
            manager.watermark_blocks = vanilla_watermark + self.growth_reserved_pages()
            try:
                return vanilla_allocate(request, *args, **kwargs)
            finally:
                manager.watermark_blocks = vanilla_watermark

        manager.allocate_slots = allocate_slots
        record("vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots (this scheduler's)",
               "patch", "admissions keep the growth of running bounded requests free")

    def growth_reserved_pages(self) -> int:
        """Pages the running requests that prefill eviction bounds may still take: each up to
        cdiv(peak_length, page), less what it holds."""
        manager = self.eviction_managers[0]
        reserved = 0
        for request in self.running:
            cfg = self.eviction_configs.get(request.request_id)
            if cfg is None or not cfg.prefill_eviction:
                continue
            peak = cfg.peak_length(request.num_prompt_tokens + request.max_tokens)
            held = len(manager.req_to_blocks.get(request.request_id, ()))
            reserved += max(0, cdiv(peak, manager.block_size) - held)
        return reserved

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        if self.page_trace is not None:
            # After scheduling: this step's pages are allocated and its evicted tail freed, and
            # num_computed_tokens already counts the tokens this step computes.
            held = self.eviction_managers[0].req_to_blocks
            self.page_trace.write([(r.request_id, r.num_computed_tokens, len(held.get(r.request_id, ())))
                                   for r in self.running])
        return output

    def add_request(self, request) -> None:
        if request.request_id not in self.requests:
            cfg = self._resolve(request)
            metrics().requests.labels(cfg.policy).inc()
            if cfg.may_evict(request.num_prompt_tokens, request.max_tokens):
                self.eviction_configs[request.request_id] = cfg
                limit = self._prefix_hit_limit(request, cfg)
                if limit == 0:
                    request.skip_reading_prefix_cache = True
                else:
                    self.prefix_hit_limits[request.request_id] = limit
        super().add_request(request)

    @staticmethod
    def _prefix_hit_limit(request, cfg: EvictionConfig) -> int:
        try:
            return cfg.prefix_hit_limit(request.num_prompt_tokens)
        except Exception:  # a third-party policy that cannot be built: it will fall back
            return 0

    def _mamba_block_aligned_split(self, request, num_new_tokens: int,
                                   num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        if self._vanilla_aligned_split:
            num_new_tokens = super()._mamba_block_aligned_split(
                request, num_new_tokens, num_new_local_computed_tokens,
                num_external_computed_tokens)
        cfg = self.eviction_configs.get(request.request_id)
        if cfg is not None:
            start = (request.num_computed_tokens + num_new_local_computed_tokens
                     + num_external_computed_tokens)
            stop = cfg.prefill_stop(start, request.num_prompt_tokens)
            if stop is not None:  # > start, so a waiting request always gets a chunk
                num_new_tokens = min(num_new_tokens, stop - start)
        return num_new_tokens

    def _get_local_prefix_cache_hit(self, request):
        blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
        limit = self.prefix_hit_limits.get(request.request_id)
        if limit is not None and hit > limit:
            # Cut the hit back to whole pages below the first prompt query the policy reads.
            page = self.eviction_managers[0].block_size
            keep = limit // page
            blocks = KVCacheBlocks(tuple(list(group[:keep]) for group in blocks.blocks))
            hit = keep * page
            boundary = min(boundary, hit)
        return blocks, hit, boundary, diverged

    def _resolve(self, request) -> EvictionConfig:
        extra_args = request.sampling_params.extra_args if request.sampling_params else None
        return self.eviction_default.for_request_or_full_cache(extra_args, request.request_id)

    def _preempt_request(self, request, *args, **kwargs) -> None:
        computed = request.num_computed_tokens
        super()._preempt_request(request, *args, **kwargs)
        if request.request_id in self.eviction_configs:
            # vLLM recomputes a preempted request from scratch; its eviction restarts too, so
            # its kept sets (and output) may differ from an uninterrupted run.
            logger.info("vllm-evict: request %s preempted at %d tokens; eviction restarts on "
                        "resume", request.request_id, computed)

    def _free_blocks(self, request) -> None:
        cfg = self.eviction_configs.pop(request.request_id, None)
        self.prefix_hit_limits.pop(request.request_id, None)
        if cfg is not None:
            self._log_finished(request, cfg)
        super()._free_blocks(request)

    def _log_finished(self, request, cfg: EvictionConfig) -> None:
        manager = self.eviction_managers[0]
        rid = request.request_id
        evicted = manager.evicted.get(rid, 0)
        if request.num_computed_tokens:
            metrics().kept_fraction.observe(1 - evicted / request.num_computed_tokens)
        logger.info(
            "vllm-evict: request %s done: policy=%s budget=%d logical_len=%d kept=%d "
            "evicted_tokens=%d pages_freed=%d",
            rid, cfg.policy, cfg.budget, request.num_computed_tokens,
            request.num_computed_tokens - evicted, evicted, manager.pages_freed.get(rid, 0))
