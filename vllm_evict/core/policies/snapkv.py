"""SnapKV (Li et al., 2024): the prompt's last queries vote for the prompt tokens to keep."""

from dataclasses import dataclass

from vllm_evict.core.observation import Observation, Observe
from vllm_evict.core.policies.base import Policy, Statistic


@dataclass
class SnapKVPolicy(Policy):
    name = "snapkv"
    summary = ("attention of the prompt's last 32 queries at the end of prefill; then decode "
               "attention accumulates (SnapKV)")
    statistic = Statistic.PREFILL_WINDOW_ATTENTION
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"
    # The SnapKV paper's window, without its pooling: measured on 60 RULER prompts, a 64-query
    # window and max-pooling each lost needle digits (docs/quality.md, "SnapKV's observation window").
    observation_window: int = 32
    pool_kernel: int = 1

    def prompt_queries_read(self, num_prompt_tokens: int) -> int | None:
        # At most the window; a prefill segment's window is within its own segment.
        return min(self.observation_window, num_prompt_tokens)

    def observation(self, row: int, num_computed_tokens: int, num_scheduled_tokens: int,
                    num_prompt_tokens: int) -> Observation | None:
        """The prompt's last `observation_window` queries, summed (and max-pooled in the chunk
        where the prompt ends); after the prompt, every decode query accumulates. With prefill
        eviction each prefill segment's last queries (within the segment) vote for the
        compaction at its end, as kvpress's chunked presses do."""
        computed, prompt = num_computed_tokens, num_prompt_tokens
        if computed >= prompt:
            return Observation(row, Observe.ACCUMULATE)
        end = computed + num_scheduled_tokens  # never past the segment's end (the scheduler)
        segment_start, segment_end = self.prefill_segment(computed, prompt)
        window_start = max(segment_start, segment_end - self.observation_window)
        if end <= window_start:
            return None  # this prefill chunk holds no window query
        return Observation(row, Observe.WINDOW, window_from=max(0, window_start - computed),
                           window_starts=computed <= window_start,
                           window_ends=end >= segment_end, pool_kernel=self.pool_kernel)
