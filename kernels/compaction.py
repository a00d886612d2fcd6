"""In-place per-head compaction of one request's pages (torch reference; the CPU path).

Gather the kept entries of every KV head to the dense front of the request's own pages, in
the order given, then zero the rest of the last kept page so the stale tail stays finite.
Sources and destinations may overlap: everything is read before anything is written.
"""

from __future__ import annotations

import torch

from vllm_evict.kernels.paged import cdiv


def compact_request_reference(
    tensors: list[torch.Tensor],
    block_ids: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """tensors: views of one layer's paged data, each [blocks, kv_heads, block_size, X]
    (keys, values, and the float32 score buffer with X = 1). block_ids: [n] int64, the
    request's pages in order. keep: [kv_heads, P] int64 physical indices to keep per head
    (P equal for all heads, every index < n * block_size)."""
    block_size = tensors[0].shape[2]
    num_heads, kept = keep.shape
    heads = torch.arange(num_heads, device=keep.device)[:, None]
    src_block, src_slot = block_ids[keep // block_size], keep % block_size
    gathered = [t[src_block, heads, src_slot] for t in tensors]  # [heads, P, X] copies

    dst = torch.arange(kept, device=keep.device)
    dst_block, dst_slot = block_ids[dst // block_size][None, :], (dst % block_size)[None, :]
    tail = torch.arange(kept, cdiv(kept, block_size) * block_size, device=keep.device)
    tail_block, tail_slot = block_ids[tail // block_size], tail % block_size
    for t, values in zip(tensors, gathered, strict=True):
        t[dst_block, heads, dst_slot] = values
        if tail.numel():
            t[tail_block, :, tail_slot] = 0
