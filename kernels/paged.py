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


def paged_index(block_row: torch.Tensor, length: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot) of physical positions 0 .. length - 1, both int64."""
    pos = torch.arange(length, device=block_row.device)
    return block_row[pos // page_size].long(), pos % page_size


def gather_paged(view: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """A copy of a request's first `length` entries of `view` [blocks, heads, page, ...] as
    [heads, length, ...]."""
    page, slot = paged_index(block_row, length, view.shape[2])
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
