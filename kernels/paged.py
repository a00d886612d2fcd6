"""Paged-cache helpers shared by the Triton launchers and their torch references (torch only).

Conventions (the same as attention/layouts.py and the score buffers of attention/stats.py):
  * K and V are views [num_blocks, kv_heads, page_size, head_dim] with arbitrary strides, so one
    kernel serves vLLM's GPU FlashAttention layout and the CPU backend's (transposed K) views.
  * A score buffer is a float32 view [num_blocks, kv_heads, page_size]; the runner's buffers are
    [num_blocks, page_size, kv_heads], so pass `buf.permute(0, 2, 1)`.
  * A request's token at physical position t lives in page block_row[t // page_size], slot
    t % page_size.
"""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MappedPagedView:
    """A [blocks, kv_heads, page_size, head_dim] view of a cache whose kernel packs each
    (block, head) tile its own way (vLLM's CPU AMX layout): `tiles` is the cache as [blocks,
    kv_heads, tile_elements] and `index[slot, dim]` the offset of that element in its tile.

    It supports the indexing the paged helpers and the compaction use, with the same result
    shapes as a tensor view: view[block, head, slot] with integer tensors (broadcast) and
    view[block, :, slot]; reads are copies, writes go through to the cache.
    """

    def __init__(self, tiles: torch.Tensor, index: torch.Tensor) -> None:
        self.tiles, self.index = tiles, index
        self.shape = torch.Size((tiles.shape[0], tiles.shape[1], *index.shape))
        self.dtype, self.device, self.is_cuda = tiles.dtype, tiles.device, tiles.is_cuda

    def data_ptr(self) -> int:
        return self.tiles.data_ptr()

    def _where(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block, head, slot = key
        offset = self.index[slot]  # [*S, D]
        if isinstance(head, slice):  # view[block, :, slot] -> [*S, heads, D]
            if head != slice(None):
                raise IndexError("MappedPagedView supports only ':' for the head dimension")
            heads = torch.arange(self.shape[1], device=self.tiles.device)
            return block[..., None, None], heads[:, None], offset[..., None, :]
        return block[..., None], head[..., None], offset

    def __getitem__(self, key: tuple) -> torch.Tensor:
        return self.tiles[self._where(key)]

    def __setitem__(self, key: tuple, values) -> None:
        self.tiles[self._where(key)] = values


def paged_index(block_row: torch.Tensor, length: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot) of physical positions 0 .. length - 1, both int64."""
    pos = torch.arange(length, device=block_row.device)
    return block_row[pos // page_size].long(), pos % page_size


def gather_paged(view: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """A copy of a request's first `length` entries of `view` [blocks, heads, page, ...] as
    [heads, length, ...]."""
    if isinstance(view, torch.Tensor):
        # Whole pages first: one index_select copies each (page, head) tile as a block, 2-6x
        # faster on CPU than indexing every (page, slot) pair (the transposed K view most).
        tiles = view.index_select(0, block_row[: cdiv(length, view.shape[2])].long())
        return tiles.transpose(0, 1).flatten(1, 2)[:, :length]
    page, slot = paged_index(block_row, length, view.shape[2])  # MappedPagedView
    return view[page, :, slot].transpose(0, 1)


def scatter_paged(view: torch.Tensor, block_row: torch.Tensor, values: torch.Tensor) -> None:
    """Inverse of gather_paged: write values [heads, length, ...] into the request's slots."""
    page, slot = paged_index(block_row, values.shape[1], view.shape[2])
    view[page, :, slot] = values.transpose(0, 1).to(view.dtype)


def check_kv_view(view: torch.Tensor, name: str) -> None:
    if view.dim() != 4:
        raise ValueError(f"{name} must be a [blocks, kv_heads, page_size, head_dim] view, "
                         f"got shape {tuple(view.shape)}")


def check_score_view(view: torch.Tensor, key_view: torch.Tensor) -> None:
    want = tuple(key_view.shape[:3])
    if view.dtype != torch.float32 or tuple(view.shape) != want:
        raise ValueError(f"score view must be float32 {want} ([blocks, kv_heads, page_size]), "
                         f"got {view.dtype} {tuple(view.shape)}")
