"""Key-similarity scoring (Triton; keydiff): per request and KV head, the cosine distance of each
held key from the mean held key, written into the paged score buffer (overwrite).

Two launches over the keys, no atomics (so the result is deterministic):
  1. `_key_sum_kernel`, grid (requests, kv_heads, cdiv(max_seq_len, split_len)): float32 sums
     of the keys of one split into partials [B, kv_heads, splits, D];
  2. `_keydiff_kernel`, grid (requests, kv_heads, cdiv(max_seq_len, BLOCK_N)): every program
     folds the request's partials into the normalised mean (splits x D loads, cheap), then
     scores its tile of positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_evict.kernels.paged import (
    check_kv_view,
    check_score_view,
    gather_paged,
    next_pow2,
    scatter_paged,
)
from vllm_evict.kernels.scoring import keydiff_scores_reference
from vllm_evict.kernels.triton_lse import load_key_tile

EPS = 1e-12  # F.normalize's floor on the norm


@triton.jit
def _key_sum_kernel(
    k_ptr, bt_ptr, seq_lens_ptr, part_ptr,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_bt, stride_pb, stride_ph, stride_ps,
    split_len,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_lens_ptr + b)
    lo = split * split_len
    if lo < seq:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        acc = tl.zeros([BLOCK_D], tl.float32)
        hi = tl.minimum(lo + split_len, seq)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            k, _ = load_key_tile(k_ptr, bt_ptr + b * stride_bt, h, t, t < hi, d, d_ok,
                                 stride_kb, stride_kh, stride_ks, stride_kd, PAGE)
            acc += tl.sum(k.to(tl.float32), axis=0)
        tl.store(part_ptr + b * stride_pb + h * stride_ph + split * stride_ps + d, acc,
                 mask=d_ok)


@triton.jit
def _keydiff_kernel(
    k_ptr, bt_ptr, seq_lens_ptr, part_ptr, s_ptr,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_bt, stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_ss,
    split_len, eps,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_lens_ptr + b)
    start = tl.program_id(2) * BLOCK_N
    if start < seq:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        total = tl.zeros([BLOCK_D], tl.float32)
        for split in range(0, tl.cdiv(seq, split_len)):
            total += tl.load(part_ptr + b * stride_pb + h * stride_ph + split * stride_ps + d,
                             mask=d_ok, other=0.0)
        mean = total / seq.to(tl.float32)
        anchor = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=0)), eps)
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < seq
        k, page = load_key_tile(k_ptr, bt_ptr + b * stride_bt, h, t, t_ok, d, d_ok,
                                stride_kb, stride_kh, stride_ks, stride_kd, PAGE)
        k = k.to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)
        score = 1.0 - tl.sum(k * anchor[None, :], axis=1) / norm
        tl.store(s_ptr + page * stride_sb + h * stride_sh + (t % PAGE) * stride_ss, score,
                 mask=t_ok)


def keydiff_scores(key_view: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   scores: torch.Tensor, *, max_seq_len: int | None = None,
                   block_n: int = 64, split_len: int = 4096, num_warps: int = 4) -> None:
    """key_view [blocks, kv_heads, page, D]; block_table [B, max_pages]; seq_lens [B];
    scores: float32 view [blocks, kv_heads, page]; positions < seq_len are overwritten."""
    check_kv_view(key_view, "key_view")
    check_score_view(scores, key_view)
    batch = seq_lens.shape[0]
    _, kv_heads, page, dim = key_view.shape
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if batch else 0
    if batch == 0 or max_seq_len == 0:
        return
    splits = triton.cdiv(max_seq_len, split_len)
    # Every split the second kernel reads (split * split_len < seq_len) is written by the first.
    part = torch.empty(batch, kv_heads, splits, dim, dtype=torch.float32, device=key_view.device)
    block_d = max(16, next_pow2(dim))
    strides = (*key_view.stride(), block_table.stride(0), *part.stride()[:3])
    _key_sum_kernel[(batch, kv_heads, splits)](
        key_view, block_table, seq_lens, part, *strides, split_len,
        HEAD_DIM=dim, PAGE=page, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    _keydiff_kernel[(batch, kv_heads, triton.cdiv(max_seq_len, block_n))](
        key_view, block_table, seq_lens, part, scores, *strides, *scores.stride(),
        split_len, EPS, HEAD_DIM=dim, PAGE=page, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )


def keydiff_scores_paged_reference(key_view: torch.Tensor, block_table: torch.Tensor,
                                   seq_lens: torch.Tensor, scores: torch.Tensor) -> None:
    """keydiff_scores_reference over each request's gathered keys, scattered into its slots."""
    for b, seq in enumerate(seq_lens.tolist()):
        keys = gather_paged(key_view, block_table[b], seq)
        scatter_paged(scores, block_table[b], keydiff_scores_reference(keys))
