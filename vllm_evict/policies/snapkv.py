"""SnapKV (Li et al., 2024): the prompt's last queries vote for the prompt tokens to keep."""

from dataclasses import dataclass

from vllm_evict.policies.base import Policy, SelectWhen, Statistic


@dataclass
class SnapKVPolicy(Policy):
    name = "snapkv"
    summary = ("attention of the prompt's last 64 queries, max-pooled (kernel 5), at the end "
               "of prefill; then decode attention accumulates (SnapKV)")
    statistic = Statistic.PREFILL_WINDOW_ATTENTION
    select_when = SelectWhen.END_OF_PREFILL
    observation_window: int = 64
    pool_kernel: int = 5
