"""Window scoring (Triton; snapkv, pyramidkv): the attention of a request's last n queries (the
observation window) over its held keys, summed over the window and the GQA group, optionally
added to the scores already held, then max-pooled along the tokens into the paged score buffer.

Three launches, each race-free by construction:
  1. the split-KV log-sum-exp of the window rows (triton_lse.py);
  2. `_window_sum_kernel`, grid (requests, kv_heads, cdiv(max_seq_len, BLOCK_N)): one program
     per tile of positions, looping over the window's row blocks with its key tile in
     registers; every position has exactly one reader and one writer;
  3. with pooling, `_max_pool_kernel` (same grid) reads the sums from a scratch buffer. Pooling
     reads neighbours that other programs own, so pooling in place (or fusing it into 2, which
     also reads the held scores in accumulate mode) would race; the scratch costs 4 bytes per
     (KV head, position), tiny next to the keys.
Chunked prefill: a window split over several steps runs "overwrite" with pool_kernel=1 in its
first step, "accumulate" with pool_kernel=1 in the middle and "accumulate" with pooling in its
last step, exactly as attention/stats.py's WINDOW observation does on the CPU.
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
from vllm_evict.kernels.scoring import attention_weights_reference, window_scores_reference
from vllm_evict.kernels.triton_lse import LOG2E, load_key_tile, paged_lse, qk_logits, use_fp32_dot

Mode = Literal["accumulate", "overwrite"]


@triton.jit
def _window_sum_kernel(
    q_ptr, q_start_ptr, lse_ptr, k_ptr, bt_ptr, seq_lens_ptr, fresh_ptr, s_ptr, raw_ptr,
    stride_qt, stride_qh, stride_qd, stride_lt, stride_lh,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_bt, stride_sb, stride_sh, stride_ss, stride_rb, stride_rh,
    scale_log2,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, ACCUMULATE: tl.constexpr,
    POOL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_lens_ptr + b)
    start = tl.program_id(2) * BLOCK_N
    if start < seq:
        q0 = tl.load(q_start_ptr + b)
        n = tl.load(q_start_ptr + b + 1) - q0
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < seq
        k, page = load_key_tile(k_ptr, bt_ptr + b * stride_bt, h, t, t_ok, d, d_ok,
                                stride_kb, stride_kh, stride_ks, stride_kd, PAGE)
        w = tl.zeros([BLOCK_N], tl.float32)
        # Row blocks whose queries all precede the tile see none of it (causal): skip them.
        first_row = tl.maximum(start - (seq - n), 0) * GROUP
        for r0 in range(first_row - first_row % ROWS, n * GROUP, ROWS):
            r = r0 + tl.arange(0, ROWS)
            j = r // GROUP
            row_ok = j < n
            qh = h * GROUP + r % GROUP
            q = tl.load(q_ptr + (q0 + j)[:, None] * stride_qt + qh[:, None] * stride_qh
                        + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            lse = tl.load(lse_ptr + (q0 + j) * stride_lt + qh * stride_lh, mask=row_ok,
                          other=0.0)
            s = qk_logits(q, k, scale_log2, DOT_FP32)
            ok = row_ok[:, None] & t_ok[None, :] & (t[None, :] <= (seq - n + j)[:, None])
            w += tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), axis=0)
        s_ptrs = s_ptr + page * stride_sb + h * stride_sh + (t % PAGE) * stride_ss
        if ACCUMULATE:
            # Positions written this step start from zero; older ones keep their score.
            fresh = tl.load(fresh_ptr + b)
            w += tl.load(s_ptrs, mask=t_ok & (t < seq - fresh), other=0.0)
        if POOL > 1:
            tl.store(raw_ptr + b * stride_rb + h * stride_rh + t, w, mask=t_ok)
        else:
            tl.store(s_ptrs, w, mask=t_ok)


@triton.jit
def _max_pool_kernel(
    raw_ptr, bt_ptr, seq_lens_ptr, s_ptr,
    stride_rb, stride_rh, stride_bt, stride_sb, stride_sh, stride_ss,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, POOL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_lens_ptr + b)
    start = tl.program_id(2) * BLOCK_N
    if start < seq:
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < seq
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        # Same length, implicit -inf padding: F.max_pool1d(stride=1, padding=POOL // 2).
        for o in tl.static_range(POOL):
            u = t + (o - POOL // 2)
            x = tl.load(raw_ptr + b * stride_rb + h * stride_rh + u,
                        mask=t_ok & (u >= 0) & (u < seq), other=float("-inf"))
            best = tl.maximum(best, x)
        page = tl.load(bt_ptr + b * stride_bt + t // PAGE, mask=t_ok, other=0).to(tl.int64)
        tl.store(s_ptr + page * stride_sb + h * stride_sh + (t % PAGE) * stride_ss, best,
                 mask=t_ok)


def window_scores(query: torch.Tensor, query_start: torch.Tensor, key_view: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  scores: torch.Tensor, mode: Mode, pool_kernel: int, *,
                  fresh: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                  max_queries: int | None = None, max_seq_len: int | None = None,
                  block_n: int = 64, rows: int = 64, split_len: int = 2048,
                  num_warps: int = 4) -> None:
    """query [T, q_heads, D]: request b's window queries are rows query_start[b] ..
    query_start[b + 1] (int32 [B + 1]), the last n_b of its seq_lens[b] held positions.
    scores: float32 view [blocks, kv_heads, page]; positions < seq_len are rewritten.

    mode "overwrite": scores = pool(window sum). "accumulate": scores = pool(held score +
    window sum), where the fresh[b] newest positions (default n_b: this step's tokens) count
    as zero. pool_kernel: odd; 1 disables pooling. lse: optional natural-log LSE [T, q_heads]
    of the same rows from the attention backend. max_queries / max_seq_len: host-side maxima,
    so the launch needs no device sync."""
    check_kv_view(key_view, "key_view")
    check_score_view(scores, key_view)
    if mode not in ("accumulate", "overwrite"):
        raise ValueError(f"mode must be 'accumulate' or 'overwrite', got {mode!r}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and positive, got {pool_kernel}")
    batch = seq_lens.shape[0]
    q_heads, dim = query.shape[1], query.shape[2]
    kv_heads, page = key_view.shape[1], key_view.shape[2]
    group = q_heads // kv_heads
    counts = query_start[1:] - query_start[:-1]
    if max_queries is None:
        max_queries = int(counts.max()) if batch else 0
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if batch else 0
    if batch == 0 or max_seq_len == 0 or max_queries == 0:
        return
    if lse is None:
        lse2 = paged_lse(query, query_start, key_view, block_table, seq_lens, scale,
                         max_queries=max_queries, max_seq_len=max_seq_len,
                         split_len=split_len, block_n=block_n, rows=rows, num_warps=num_warps)
    else:
        lse2 = lse.float() * LOG2E
    if fresh is None:
        fresh = counts.to(torch.int32)
    raw = scores  # unused unless pooling (any tensor will do as the pointer)
    if pool_kernel > 1:
        raw = torch.empty(batch, kv_heads, max_seq_len, dtype=torch.float32, device=query.device)
    grid = (batch, kv_heads, triton.cdiv(max_seq_len, block_n))
    _window_sum_kernel[grid](
        query, query_start, lse2, key_view, block_table, seq_lens, fresh, scores, raw,
        *query.stride(), *lse2.stride(), *key_view.stride(), block_table.stride(0),
        *scores.stride(), raw.stride(0), raw.stride(1), scale * LOG2E,
        HEAD_DIM=dim, PAGE=page, GROUP=group, ROWS=max(16, min(next_pow2(rows), next_pow2(max_queries * group))),
        BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(dim)),
        DOT_FP32=use_fp32_dot(query.dtype, key_view.dtype), ACCUMULATE=mode == "accumulate",
        POOL=pool_kernel, num_warps=num_warps,
    )
    if pool_kernel > 1:
        _max_pool_kernel[grid](
            raw, block_table, seq_lens, scores, raw.stride(0), raw.stride(1),
            block_table.stride(0), *scores.stride(), PAGE=page, BLOCK_N=block_n,
            POOL=pool_kernel, num_warps=num_warps,
        )


def window_scores_paged_reference(query: torch.Tensor, query_start: torch.Tensor,
                                  key_view: torch.Tensor, block_table: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float, scores: torch.Tensor,
                                  mode: Mode, pool_kernel: int,
                                  fresh: torch.Tensor | None = None) -> None:
    """The same update with attention_weights_reference, window_scores_reference and
    stats.py's slot logic (fresh positions start from zero)."""
    starts = query_start.tolist()
    for b, seq in enumerate(seq_lens.tolist()):
        q = query[starts[b]:starts[b + 1]]
        weights = attention_weights_reference(q, gather_paged(key_view, block_table[b], seq),
                                              scale)  # [n, kv_heads, S]
        if mode == "accumulate":
            held = gather_paged(scores, block_table[b], seq).clone()
            held[:, seq - (len(q) if fresh is None else int(fresh[b])):] = 0
            weights = torch.cat([held[None], weights])
        scatter_paged(scores, block_table[b], window_scores_reference(weights, pool_kernel))
