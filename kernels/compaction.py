"""In-place per-head compaction of requests' pages (torch reference; the CPU path).

Gather the kept entries of every KV head to the dense front of each request's own pages, in the
order given, then zero the rest of the last kept page so the stale tail stays finite. Sources
and destinations may overlap: everything is read before anything is written. A first compaction
under prefix caching writes to fresh pages instead (copy on write). Requests never share the
pages they write, so the requests that compact in one step are moved together: the indices are
built once for every layer (compaction_indices), then each layer is one gather and one scatter
per tensor (apply_compaction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_evict.kernels.paged import cdiv


@dataclass
class CompactionIndices:
    """Where every kept entry of a step's compacting requests comes from and goes to."""

    src_block: torch.Tensor  # [layers, kv_heads, N]
    src_slot: torch.Tensor
    dst_block: torch.Tensor  # [kv_heads or 1, N]: the same in every layer
    dst_slot: torch.Tensor
    tail_block: torch.Tensor  # [T]: the rest of each request's last kept page
    tail_slot: torch.Tensor


def compaction_indices(block_ids: list[torch.Tensor], keep: list[torch.Tensor],
                       block_size: int,
                       dst_block_ids: list[torch.Tensor | None] | None = None) -> CompactionIndices:
    """block_ids[r]: [n_r] int64, request r's pages in order; keep[r]: [layers, kv_heads, P_r]
    int64 physical indices to keep per (layer, head), every index < n_r * block_size.
    dst_block_ids[r]: the pages request r's kept entries go to (copy on write: fresh pages, at
    least cdiv(P_r, block_size) of them, disjoint from every source page); None: its own."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in CompactionIndices.__dataclass_fields__}
    dst_block_ids = dst_block_ids or [None] * len(block_ids)
    for ids, kept, dst_ids in zip(block_ids, keep, dst_block_ids, strict=True):
        parts["src_block"].append(ids[kept // block_size])
        parts["src_slot"].append(kept % block_size)
        out = ids if dst_ids is None else dst_ids
        dst = torch.arange(kept.shape[-1], device=kept.device)
        parts["dst_block"].append(out[dst // block_size][None])
        parts["dst_slot"].append((dst % block_size)[None])
        tail = torch.arange(kept.shape[-1], cdiv(kept.shape[-1], block_size) * block_size,
                            device=kept.device)
        parts["tail_block"].append(out[tail // block_size])
        parts["tail_slot"].append(tail % block_size)
    return CompactionIndices(**{k: torch.cat(v, dim=-1) for k, v in parts.items()})


def apply_compaction(tensors: list[torch.Tensor], layer: int, idx: CompactionIndices) -> None:
    """tensors: views of one layer's paged data, each [blocks, kv_heads, block_size, X] (keys,
    values, and the float32 score buffer with X = 1)."""
    heads = torch.arange(tensors[0].shape[1], device=idx.src_block.device)[:, None]
    src_block, src_slot = idx.src_block[layer], idx.src_slot[layer]
    gathered = [t[src_block, heads, src_slot] for t in tensors]  # [heads, N, X] copies
    for t, values in zip(tensors, gathered, strict=True):
        t[idx.dst_block, heads, idx.dst_slot] = values
        if idx.tail_block.numel():
            t[idx.tail_block, :, idx.tail_slot] = 0


def compact_request_reference(tensors: list[torch.Tensor], block_ids: torch.Tensor,
                              keep: torch.Tensor) -> None:
    """One request, one layer: keep [kv_heads, P] ascending per head."""
    idx = compaction_indices([block_ids], [keep[None]], tensors[0].shape[2])
    apply_compaction(tensors, 0, idx)
