"""Kernels over paged block tables. Each job has a torch reference (which also serves CPU);
Triton versions for GPU sit beside them. Installed as `vllm_evict.kernels`."""

from vllm_evict.kernels.compaction import compact_request_reference
from vllm_evict.kernels.scoring import (
    attention_weights_reference,
    keydiff_scores_reference,
    knorm_scores_reference,
    window_scores_reference,
)

__all__ = [
    "attention_weights_reference",
    "compact_request_reference",
    "keydiff_scores_reference",
    "knorm_scores_reference",
    "window_scores_reference",
]
