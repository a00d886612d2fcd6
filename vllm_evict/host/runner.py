"""The model-runner side of eviction (vLLM's V1 runner: CPU, and GPU with V1 selected).

Two hooks, both at the step boundary:
  _update_states: before vLLM applies the scheduler's output (which appends new pages and may
      hand pages this step freed to other requests), compact every scheduled request whose held
      length passes `physical_length(num_computed_tokens)` and drop the pages the scheduler
      freed from its block-table row. With prefix caching, a request's first compaction writes
      to fresh pages (copy on write, host/kv_cache.py): they lead this step's new page ids, and
      the row drops every page it held before.
  _prepare_inputs: after vLLM computed logical positions, make `seq_lens` and `slot_mapping`
      physical by subtracting each request's `evicted` count. Positions stay logical (RoPE).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from vllm_evict.core import observation as stats
from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.dump import KeptPositionsDump
from vllm_evict.core.policies import SelectionInput, Statistic, check_selection, fallback_selection
from vllm_evict.core.rope import RopeTable
from vllm_evict.core.state import RequestEvictionState, hidden_first
from vllm_evict.host.metrics import metrics
from vllm_evict.kernels.compaction import apply_compaction, compaction_indices
from vllm_evict.kernels.paged import cdiv, gather_paged

logger = logging.getLogger("vllm.evict")
PAGED_SCORE_KINDS = (stats.Observe.ACCUMULATE, stats.Observe.LATEST, stats.Observe.WINDOW)
"""The observations that write an attention statistic per held entry."""


class EvictionRunnerMixin:
    """Mixed in front of GPUModelRunner or one of its subclasses (CPUModelRunner)."""

    def init_eviction(self, rank: int = 0) -> None:
        from vllm.platforms import current_platform

        self.eviction_default = (EvictionConfig.from_additional_config(
            self.vllm_config.additional_config) or EvictionConfig())
        self.eviction_states: dict[str, RequestEvictionState] = {}
        self.eviction_step = 0
        self.eviction_dump = KeptPositionsDump.from_env(rank)
        self._eviction_is_cpu = current_platform.is_cpu()
        self._eviction_views: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._score_buffers: list[torch.Tensor] = []

    # ------------------------------------------------------------------ vLLM hooks

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        result = super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        self._check_supported(kv_cache_config)
        self._kv_views()  # probes the CPU layout: an unknown one stops the engine at start
        return result

    def _check_supported(self, kv_cache_config) -> None:
        """Refuse, at start, every layout the data path cannot handle (host/support.py)."""
        from vllm_evict.host import support
        from vllm_evict.host.attention.observing import ObservingImpl
        from vllm_evict.host.kv_cache import EvictableAttentionSpec

        groups = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
        layers = {name: layer for name, layer in
                  self.compilation_config.static_forward_context.items()
                  if hasattr(layer, "impl") and hasattr(layer, "kv_cache")}
        windowed = sorted(name for name, layer in layers.items()
                          if getattr(layer.impl, "sliding_window", None) not in (None, -1, (-1, -1)))
        support.check_kv_cache_groups(
            [type(spec).__name__ for spec in groups],
            [isinstance(spec, EvictableAttentionSpec) and not windowed for spec in groups])
        support.check_layer_caches([tuple(kv.shape) for kv in self.kv_caches],
                                   [kv.data_ptr() for kv in self.kv_caches],
                                   self.shared_kv_cache_layers)
        support.check_backends({name: type(layer.impl).__name__ for name, layer in layers.items()
                                if not isinstance(layer.impl, ObservingImpl)})
        rows = self.kv_caches[0].shape[0] if self.kv_caches else kv_cache_config.num_blocks
        if rows != kv_cache_config.num_blocks:
            # Compaction and the block-table truncation work in scheduler pages.
            raise support.UnsupportedSetupError(
                f"vllm-evict needs the attention kernel's block size to equal --block-size: the "
                f"KV cache has {rows} kernel blocks for {kv_cache_config.num_blocks} pages; pass "
                "a --block-size the attention backend supports natively")
        if self._eviction_is_cpu:
            isas = {getattr(layer, "isa", None) for layer in layers.values()}
            if len(isas) != 1 or None in isas:
                raise support.UnsupportedSetupError(
                    f"vllm-evict: the CPU attention layers use ISAs {sorted(map(str, isas))}; "
                    "eviction needs one ISA for every layer")
            self._eviction_isa = isas.pop()
            views = self._kv_views()
            logger.info("vllm-evict: CPU attention ISA %s; KV layout probed with vLLM's "
                        "cache-write op: %s", self._eviction_isa,
                        type(views[0][0]).__name__ if views else "no layers")

    def _update_states(self, scheduler_output):
        self.eviction_step += 1
        for req_id in scheduler_output.finished_req_ids:
            self.eviction_states.pop(req_id, None)
        self._compact_scheduled(scheduler_output)
        result = super()._update_states(scheduler_output)
        for new_req in scheduler_output.scheduled_new_reqs:
            self._track(new_req.req_id, new_req.sampling_params)
        return result

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        evicted = np.zeros(num_reqs, dtype=np.int64)
        for i, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            state = self.eviction_states.get(req_id)
            if state is not None:
                evicted[i] = state.evicted
        if evicted.any():
            offsets = torch.from_numpy(evicted)
            self.seq_lens[:num_reqs] -= offsets.to(self.seq_lens.device, self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= offsets.to(self.optimistic_seq_lens_cpu.dtype)
            token_req = np.repeat(np.arange(num_reqs), num_scheduled_tokens)
            num_tokens = len(token_req)
            physical = self.positions[:num_tokens] - torch.from_numpy(evicted[token_req]).to(
                self.positions.device)
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical)
        stats.begin_step(self._plan_observations(num_scheduled_tokens))
        return result

    def execute_model(self, *args, **kwargs):
        try:
            result = super().execute_model(*args, **kwargs)
            plan = stats.current_plan()
            if plan is not None:
                started = time.perf_counter()
                stats.finish_step(plan)
                metrics().scoring_seconds.inc(
                    plan.scoring_seconds + time.perf_counter() - started)
            return result
        finally:
            stats.begin_step(None)  # dummy and profiling runs must never observe

    # ------------------------------------------------------------------ bookkeeping

    def _track(self, req_id: str, sampling_params) -> None:
        extra_args = sampling_params.extra_args if sampling_params is not None else None
        cfg = self.eviction_default.for_request_or_full_cache(extra_args, req_id)
        if cfg.evicts:
            req_state = self.requests[req_id]
            state = RequestEvictionState(cfg)
            state.may_evict = cfg.may_evict(req_state.num_prompt_tokens, sampling_params.max_tokens)
            state.shares_pages = cfg.shares_pages(req_state.num_prompt_tokens)
            self.eviction_states[req_id] = state

    def _plan_observations(self, num_scheduled_tokens) -> stats.StepPlan | None:
        """Which requests of this step need which attention statistic."""
        observations = []
        for row, req_id in enumerate(self.input_batch.req_ids[: self.input_batch.num_reqs]):
            state = self.eviction_states.get(req_id)
            if state is None or not state.may_evict:
                continue
            computed, scheduled = (int(self.input_batch.num_computed_tokens_cpu[row]),
                                   int(num_scheduled_tokens[row]))
            prompt = self.requests[req_id].num_prompt_tokens
            try:
                observation = state.policy.observation(row, computed, scheduled, prompt)
            except Exception as exc:  # third-party code: measure nothing for this request
                self._policy_failed(state, req_id, exc)
                observation = None
            if observation is not None and observation.kind is stats.Observe.LATEST and \
                    not state.compacts_within(computed, scheduled, prompt):
                # The latest query's attention overwrites every held entry and is read only by
                # a compaction, so only the step right before one needs it (tova: ~1 step in
                # slack + 1 instead of every step).
                observation = None
            if observation is not None:
                observation.visible = state.visible
                observation.backend_hides = state.hidden_pages is not None
                observation.moments = state.query_moments
                shared = (observation.kind in PAGED_SCORE_KINDS
                          and self._pages_may_be_shared(state))
                pending = state.pending_queries
                # On CPU; the GPU measures it in its own step with one Triton launch for the
                # batch (attention/gpu.py).
                deferred = self._eviction_is_cpu and stats.defers(observation, scheduled)
                if shared and not deferred:
                    views = self._kv_views()
                    key0 = views[0][0]
                    observation.private_scores = state.private_scores_for(
                        computed + scheduled, len(views), key0.shape[1], key0.device)
                if len(pending) >= stats.PENDING_QUERIES_LIMIT or (len(pending) and not deferred):
                    self._flush_pending_queries(state, self._page_ids(req_id))
                if deferred:
                    observation.pending = pending
                observations.append(observation)
        hidden_pages = self._hidden_pages_of_rows()
        if not observations and hidden_pages is None:
            return None
        self._kv_views()
        # The rows' query starts and physical lengths, from the host's own arrays, so the
        # attention wrappers never read them back from the device.
        num_reqs = self.input_batch.num_reqs
        scheduled = [int(n) for n in num_scheduled_tokens[:num_reqs]]
        starts = np.concatenate([[0], np.cumsum(scheduled)]).tolist()
        lengths = [int(self.input_batch.num_computed_tokens_cpu[row]) + scheduled[row]
                   - self._evicted_of_row(row) for row in range(num_reqs)]
        return stats.StepPlan(observations, self._score_buffers, self._layer_of_cache,
                              rope=self._rope_table(), host_layout=(starts, lengths),
                              kv_views=self._kv_views(), hidden_pages=hidden_pages)

    def _hidden_pages_of_rows(self) -> list[list[int]] | None:
        """StepPlan.hidden_pages: per layer, per row, the first pages its attention skips."""
        rows = self.input_batch.req_ids[: self.input_batch.num_reqs]
        states = [self.eviction_states.get(req_id) for req_id in rows]
        hiding = [s.hidden_pages if s is not None else None for s in states]
        if all(h is None for h in hiding):
            return None
        num_layers = len(next(h for h in hiding if h is not None))
        return [[h[layer] if h is not None else 0 for h in hiding] for layer in range(num_layers)]

    def _page_ids(self, req_id: str) -> torch.Tensor:
        """The request's page ids, on the device that holds the cache."""
        return torch.tensor(self.requests[req_id].block_ids[0], dtype=torch.int64,
                            device=self._kv_views()[0][0].device)

    def _flush_pending_queries(self, state: RequestEvictionState, pages: torch.Tensor) -> None:
        """Fold a request's buffered decode queries into its scores (before anything reads
        them or another observation adds to them); pages: its page ids."""
        latest = state.policy.statistic is Statistic.LATEST_QUERY_ATTENTION
        if latest or not len(state.pending_queries):
            return  # a buffered LATEST query is scored by the compaction that reads it
        views = self._kv_views()
        started = time.perf_counter()
        private = None
        if self._pages_may_be_shared(state):  # its scores stay its own until it compacts
            key0 = views[0][0]
            private = state.private_scores_for(max(state.pending_queries.lengths), len(views),
                                               key0.shape[1], key0.device)
        stats.flush_pending_queries(state.pending_queries, self._score_buffers,
                                    [k for k, _ in views], pages, self._eviction_page_size,
                                    private, state.visible)
        metrics().scoring_seconds.inc(time.perf_counter() - started)

    def _evicted_of_row(self, row: int) -> int:
        state = self.eviction_states.get(self.input_batch.req_ids[row])
        return state.evicted if state is not None else 0

    def _rope_table(self) -> RopeTable | None:
        """The model's rotary table (vLLM's RotaryEmbedding.cos_sin_cache, float32), for the
        query statistics of expected attention; None for a model without one."""
        if not hasattr(self, "_eviction_rope"):
            self._eviction_rope = None
            rotary = next((m for m in self.model.modules() if hasattr(m, "cos_sin_cache")
                           and hasattr(m, "is_neox_style")), None)
            if rotary is not None:
                self._eviction_rope = RopeTable(rotary.cos_sin_cache.float().clone(),
                                                neox=bool(rotary.is_neox_style))
        return self._eviction_rope

    def _compact_scheduled(self, scheduler_output) -> None:
        cached = scheduler_output.scheduled_cached_reqs
        due, trims = [], []
        for i, req_id in enumerate(cached.req_ids):
            state = self.eviction_states.get(req_id)
            if state is None:
                continue
            if req_id in cached.resumed_req_ids:
                state.reset()
                continue
            if not state.may_evict:
                continue  # the scheduler leaves its pages alone too: vanilla behaviour
            computed = cached.num_computed_tokens[i]
            target = state.config.physical_length(computed, self.requests[req_id].num_prompt_tokens)
            keep_pages = cdiv(target, self._eviction_page_size)
            if computed - state.evicted > target:
                fresh = None
                if self._pages_may_be_shared(state):
                    fresh = self._copy_on_write_pages(req_id, cached.new_block_ids[i], keep_pages)
                    keep_pages = 0  # the fresh pages arrive with this step's new page ids
                due.append((req_id, state, computed, target, fresh))
            trims.append((req_id, keep_pages))
        if due:
            started = time.perf_counter()
            self._compact(due)
            metrics().compaction_seconds.inc(time.perf_counter() - started)
        # Every step, as the scheduler does (EvictionKVCacheManager.remove_skipped_blocks):
        # pages past the physical length go, compacted or not. With speculative decoding these
        # are the pages of rejected drafts' lookahead, which the scheduler frees and may hand
        # out again in this very step.
        for req_id, keep_pages in trims:
            self._drop_freed_pages(req_id, self.requests[req_id], keep_pages)

    def _pages_may_be_shared(self, state: RequestEvictionState) -> bool:
        """With prefix caching, until its first compaction (the scheduler's twin:
        EvictionKVCacheManager.copies_on_write): its scores go to a private buffer and that
        compaction copies on write."""
        return (self.cache_config.enable_prefix_caching and state.shares_pages
                and state.evicted == 0)

    @staticmethod
    def _copy_on_write_pages(req_id: str, new_block_ids, count: int) -> list[int]:
        """The fresh pages the scheduler allocated for a first compaction: the first `count`
        of this step's new page ids (EvictionKVCacheManager.allocate_new_blocks)."""
        pages = list(new_block_ids[0]) if new_block_ids is not None else []
        if len(pages) < count:
            raise RuntimeError(
                f"vllm-evict: request {req_id} compacts for the first time with prefix caching "
                f"on, so it needs {count} fresh pages from the scheduler, but this step brings "
                f"{len(pages)}; the scheduler and the workers disagree (a plugin bug)")
        return pages[:count]

    def _kv_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) views, and the float32 score buffers laid out like the pages."""
        if self._eviction_views is None:
            from vllm_evict.host.attention.layouts import cpu_views, gpu_views

            self._eviction_views = [
                cpu_views(kv, self._eviction_isa) if self._eviction_is_cpu else gpu_views(kv)
                for kv in self.kv_caches]
            self._layer_of_cache = {kv.data_ptr(): i for i, kv in enumerate(self.kv_caches)}
            if self._eviction_views:
                self._eviction_page_size = self._eviction_views[0][0].shape[2]
            self._score_buffers = [
                torch.zeros(k.shape[0], k.shape[2], k.shape[1], dtype=torch.float32, device=k.device)
                for k, _ in self._eviction_views]
        return self._eviction_views

    def _compact(self, due: list[tuple[str, RequestEvictionState, int, int, list[int] | None]]
                 ) -> None:
        """Compact every (request, state, computed, target, fresh pages) due in this step: each
        request's selection on the device that holds the cache, then one move per layer for all
        of them. Fresh pages (copy on write) receive the kept entries; None: in place."""
        # One KV cache group: checked when the KV cache was set up (_check_supported).
        views = self._kv_views()
        key0 = views[0][0]
        num_layers, num_heads, page_size = len(views), key0.shape[1], key0.shape[2]
        page_lists, keeps, fresh_lists, private = [], [], [], []
        for req_id, state, computed, target, fresh in due:
            held = computed - state.evicted
            pages = self.requests[req_id].block_ids[0]
            page_ids = torch.tensor(pages[: cdiv(held, page_size)], dtype=torch.int64,
                                    device=key0.device)
            self._flush_pending_queries(state, page_ids)
            positions = state.held_positions(computed, num_layers, num_heads).to(key0.device)
            inp = self._selection_input(req_id, state, computed, target, page_ids, positions)
            keep, visible = self._select(state, inp)
            keep = keep.to(key0.device)
            hidden_pages = None
            if visible is not None and self._eviction_is_cpu:
                # The CPU backend skips a layer's first pages (attention/cpu.py), so hidden
                # entries go there and attention needs no mask. The GPU's in-place compaction
                # needs ascending indices: there they are masked.
                keep, visible, hidden_pages = hidden_first(keep, visible.to(key0.device),
                                                           page_size)
            page_lists.append(page_ids)
            keeps.append(keep)
            fresh_lists.append(None if fresh is None else
                               torch.tensor(fresh, dtype=torch.int64, device=key0.device))
            if state.private_scores is not None:  # goes with its first compaction's pages
                private.append((fresh_lists[-1], keep, state.private_scores))
                state.private_scores = None
            state.record_compaction(positions.gather(-1, keep), computed, visible, hidden_pages)
            if self.eviction_dump is not None:
                self.eviction_dump.write(req_id, self.eviction_step, computed,
                                         state.visible_positions())
        copies = any(f is not None for f in fresh_lists)
        if key0.is_cuda and not copies:  # in place, no temporary (kernels/triton_compaction.py)
            from vllm_evict.kernels.triton_compaction import batch_tables, compact

            table, kept, counts = batch_tables(page_lists, keeps)
            for layer, (key, value) in enumerate(views):
                compact(key, value, self._score_buffers[layer].permute(0, 2, 1), table,
                        kept[layer], counts)
            return
        # CPU, and a step with a copy-on-write compaction on GPU (a request's first only).
        indices = compaction_indices(page_lists, keeps, page_size, fresh_lists)
        for layer, (key, value) in enumerate(views):
            score_view = self._score_buffers[layer].permute(0, 2, 1)  # [blocks, heads, page]
            apply_compaction([key, value, score_view.unsqueeze(-1)], layer, indices)
        for fresh, keep, scores in private:
            slots = stats.page_slots(fresh, keep.shape[-1], page_size)
            for layer, buf in enumerate(self._score_buffers):
                buf.view(-1, num_heads)[slots] = scores[layer].T.gather(-1, keep[layer]).T

    def _selection_input(self, req_id: str, state: RequestEvictionState, computed: int,
                         target: int, page_ids: torch.Tensor,
                         positions: torch.Tensor) -> SelectionInput:
        """What the policy reads, gathered from the device's pages (no host copy)."""
        views = self._kv_views()
        held = computed - state.evicted
        statistic = state.policy.statistic
        scores = keys = values = None
        if statistic in (Statistic.KEYS, Statistic.QUERY_MOMENTS):
            keys = torch.stack([gather_paged(k, page_ids, held) for k, _ in views])
        if statistic is Statistic.LATEST_QUERY_ATTENTION and len(state.pending_queries):
            scores = stats.latest_query_scores(state.pending_queries, [k for k, _ in views],
                                               page_ids, held)
            state.pending_queries.clear()
        elif statistic is Statistic.QUERY_MOMENTS:
            values = torch.stack([gather_paged(v, page_ids, held) for _, v in views])
        elif statistic not in (Statistic.NONE, Statistic.KEYS) and state.private_scores is not None:
            scores = torch.stack([buf[:held].T for buf in state.private_scores])
        elif statistic not in (Statistic.NONE, Statistic.KEYS):
            slots = stats.page_slots(page_ids, held, self._eviction_page_size)
            num_heads = views[0][0].shape[1]
            scores = torch.stack([buf.view(-1, num_heads)[slots].T for buf in self._score_buffers])
        return SelectionInput(request_id=req_id, positions=positions, num_computed_tokens=computed,
                              target_length=target, config=state.config, scores=scores,
                              keys=keys, values=values, query_moments=state.query_moments,
                              rope=self._rope_table(), page_size=self._eviction_page_size)

    def _select(self, state: RequestEvictionState, inp: SelectionInput):
        """The policy's selection, or, if the policy raises or returns something malformed,
        sinks + recent window: the scheduler has already freed the pages, so this compaction
        must happen, and one request's failing policy must not stop the engine."""
        try:
            keep = state.policy.select(inp)
            visible = state.policy.visible(inp, keep)
            check_selection(inp, keep, visible)
            return keep, visible
        except Exception as exc:  # third-party code: anything may go wrong
            self._policy_failed(state, inp.request_id, exc)
            return fallback_selection(inp), None

    @staticmethod
    def _policy_failed(state: RequestEvictionState, req_id: str, exc: Exception) -> None:
        """Count every failure; log the first of each request."""
        metrics().policy_failures.labels(state.config.policy).inc()
        if not state.policy_failed:
            state.policy_failed = True
            logger.error("vllm-evict: policy %r failed for request %s (%s: %s); its "
                         "compactions keep sinks + recent tokens instead",
                         state.config.policy, req_id, type(exc).__name__, exc)

    def _drop_freed_pages(self, req_id: str, req_state, keep_pages: int) -> None:
        """Mirror the scheduler, which returned every page past `keep_pages` to the pool."""
        del req_state.block_ids[0][keep_pages:]
        row = self.input_batch.req_id_to_index.get(req_id)
        if row is None:
            return  # re-added from req_state.block_ids when scheduled again
        table = self.input_batch.block_table[0]
        num_pages = table.num_blocks_per_row[row]
        if num_pages > keep_pages:
            table.block_table.np[row, keep_pages:num_pages] = 0
            table.num_blocks_per_row[row] = keep_pages
