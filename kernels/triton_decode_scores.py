"""Decode scoring (Triton): each decode query's attention weight on every held token, per KV head
summed over its GQA group, written into the paged score buffer (h2o accumulates, tova
overwrites).

Pass 1 is the split-KV log-sum-exp (triton_lse.py), skipped when the attention backend hands
over its own LSE. Pass 2 (this kernel) recomputes one tile of logits per program and writes
exp2(logit - lse) summed over the group. K is read through the block table with explicit
(block, head, slot, dim) strides, so any layout in paged.py's convention works.

Grid: (requests, kv_heads, cdiv(max_seq_len, BLOCK_N)); a program owns BLOCK_N consecutive
positions of one request and KV head, so every score slot has exactly one writer.
"""

from __future__ import annotations

from typing import Literal

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
from vllm_evict.kernels.scoring import attention_weights_reference
from vllm_evict.kernels.triton_lse import LOG2E, load_key_tile, paged_lse, qk_logits, use_fp32_dot

Mode = Literal["accumulate", "overwrite"]


@triton.jit
def _decode_scores_kernel(
    q_ptr, lse_ptr, k_ptr, bt_ptr, seq_lens_ptr, s_ptr,
    stride_qb, stride_qh, stride_qd, stride_lb, stride_lh,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_bt, stride_sb, stride_sh, stride_ss,
    scale_log2,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_lens_ptr + b)
    start = tl.program_id(2) * BLOCK_N
    if start < seq:
        # The group's query heads are the rows of a [ROWS >= 16, D] tile (tl.dot's minimum).
        g = tl.arange(0, ROWS)
        g_ok = g < GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh
                    + d[None, :] * stride_qd, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + b * stride_lb + (h * GROUP + g) * stride_lh, mask=g_ok, other=0.0)
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < seq
        k, page = load_key_tile(k_ptr, bt_ptr + b * stride_bt, h, t, t_ok, d, d_ok,
                                stride_kb, stride_kh, stride_ks, stride_kd, PAGE)
        s = qk_logits(q, k, scale_log2, DOT_FP32)
        p = tl.where(g_ok[:, None] & t_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        w = tl.sum(p, axis=0)
        s_ptrs = s_ptr + page * stride_sb + h * stride_sh + (t % PAGE) * stride_ss
        if ACCUMULATE:
            # The new token (position seq - 1) starts from zero: its slot may hold stale data.
            w += tl.load(s_ptrs, mask=t < seq - 1, other=0.0)
        tl.store(s_ptrs, w, mask=t_ok)


def decode_scores(query: torch.Tensor, key_view: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, scores: torch.Tensor, mode: Mode, *,
                  lse: torch.Tensor | None = None, max_seq_len: int | None = None,
                  block_n: int = 64, split_len: int = 2048, num_warps: int = 4) -> None:
    """query [B, q_heads, D] (one decode query per request, at position seq_len - 1);
    key_view [blocks, kv_heads, page, D]; block_table [B, max_pages] int32; seq_lens [B] int32;
    scores: float32 view [blocks, kv_heads, page], updated in place for positions < seq_len.

    lse: the attention backend's natural-log LSE [B, q_heads] of the same query (e.g.
    FlashAttention's softmax_lse), which saves the first pass over the keys.
    max_seq_len: max(seq_lens) from the host, so the launch needs no device sync."""
    check_kv_view(key_view, "key_view")
    check_score_view(scores, key_view)
    if mode not in ("accumulate", "overwrite"):
        raise ValueError(f"mode must be 'accumulate' or 'overwrite', got {mode!r}")
    batch, q_heads, dim = query.shape
    kv_heads, page = key_view.shape[1], key_view.shape[2]
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if batch else 0
    if batch == 0 or max_seq_len == 0:
        return
    if lse is None:
        starts = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
        lse2 = paged_lse(query, starts, key_view, block_table, seq_lens, scale, max_queries=1,
                         max_seq_len=max_seq_len, split_len=split_len, block_n=block_n,
                         num_warps=num_warps)
    else:
        lse2 = lse.float() * LOG2E
    group = q_heads // kv_heads
    grid = (batch, kv_heads, triton.cdiv(max_seq_len, block_n))
    _decode_scores_kernel[grid](
        query, lse2, key_view, block_table, seq_lens, scores,
        *query.stride(), *lse2.stride(), *key_view.stride(), block_table.stride(0),
        *scores.stride(), scale * LOG2E,
        HEAD_DIM=dim, PAGE=page, GROUP=group, ROWS=max(16, next_pow2(group)), BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(dim)), DOT_FP32=use_fp32_dot(query.dtype, key_view.dtype),
        ACCUMULATE=mode == "accumulate", num_warps=num_warps,
    )


def decode_scores_reference(query: torch.Tensor, key_view: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            scores: torch.Tensor, mode: Mode) -> None:
    """The same update with attention_weights_reference and stats.py's slot logic."""
    for b, seq in enumerate(seq_lens.tolist()):
        keys = gather_paged(key_view, block_table[b], seq)
        weights = attention_weights_reference(query[b:b + 1], keys, scale)[0]  # [kv_heads, S]
        if mode == "accumulate":
            old = gather_paged(scores, block_table[b], seq).clone()
            old[:, seq - 1] = 0  # the new token's slot is zeroed before the add
            weights = old + weights
        scatter_paged(scores, block_table[b], weights)
