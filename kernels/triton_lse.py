"""Split-KV log-sum-exp of queries over paged keys (Triton), shared by decode and window scoring.

Attention weights need each query row's softmax normaliser before any weight can be written, so
scoring is two passes over the keys: this one (an online max/sum per split of the keys, then a
tiny merge) and the weights pass of the scoring kernel. Nothing of size seq x seq is built:
a program holds one [rows, BLOCK_N] tile of logits at a time. When the attention backend already
returns the LSE (FlashAttention's `softmax_lse`), the scoring launchers skip this pass.

Rows: request b has n_b queries (rows query_start[b] .. query_start[b + 1] of `query`); query j
sits at physical position seq_len - n_b + j and sees keys 0 .. seq_len - n_b + j (causal). A
program handles one (request, KV head, row block, key split); a row is (query j, head g of the
KV head's GQA group), row = j * GROUP + g.

Grid: (requests, kv_heads * row_blocks, splits), splits = cdiv(max_seq_len, split_len); then
`_lse_merge_kernel` folds a request's splits, grid (requests, kv_heads * row_blocks).
LSE units: base 2 of logits scaled by scale * log2(e), i.e. lse2 = ln-LSE * log2(e).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_evict.kernels.paged import cdiv, check_kv_view, next_pow2

LOG2E = math.log2(math.e)


def use_fp32_dot(q_dtype: torch.dtype, k_dtype: torch.dtype) -> bool:
    """Multiply in the cache's 16-bit type (tensor cores, fp32 accumulation: the products are
    exact) unless the types differ or are fp32. Triton's interpreter stores bf16 as uint16 and
    multiplies the raw bits, so bf16 tiles are upcast there (same values, same result)."""
    if q_dtype != k_dtype or k_dtype not in (torch.float16, torch.bfloat16):
        return True
    return k_dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


@triton.jit
def load_key_tile(k_ptr, bt_row_ptr, h, t, t_ok, d, d_ok,
                  stride_kb, stride_kh, stride_ks, stride_kd, PAGE: tl.constexpr):
    """Keys of positions t [BLOCK_N] of one request and KV head, read through the block table.
    Returns the tile [BLOCK_N, BLOCK_D] and the pages [BLOCK_N] (int64: page * stride can pass
    2**31 elements on a large pool)."""
    page = tl.load(bt_row_ptr + t // PAGE, mask=t_ok, other=0).to(tl.int64)
    ptrs = (k_ptr + page[:, None] * stride_kb + h * stride_kh
            + (t % PAGE)[:, None] * stride_ks + d[None, :] * stride_kd)
    return tl.load(ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0), page


@triton.jit
def qk_logits(q, k, scale_log2, DOT_FP32: tl.constexpr):
    """q [ROWS, D] . k [N, D]^T in float32, scaled to base-2 logits."""
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * scale_log2


@triton.jit
def _lse_partial_kernel(
    q_ptr, q_start_ptr, k_ptr, bt_ptr, seq_lens_ptr, m_ptr, l_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_bt, stride_ps, stride_pt,
    scale_log2, split_len,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1) // ROW_BLOCKS
    rb = tl.program_id(1) % ROW_BLOCKS
    split = tl.program_id(2)
    seq = tl.load(seq_lens_ptr + b)
    lo = split * split_len
    q0 = tl.load(q_start_ptr + b)
    n = tl.load(q_start_ptr + b + 1) - q0
    r = rb * ROWS + tl.arange(0, ROWS)
    j = r // GROUP
    row_ok = j < n
    # Splits past the sequence and row blocks past the request's queries write nothing: the
    # merge reads only the request's own splits and rows.
    if (lo < seq) & (rb * ROWS < n * GROUP):
        qh = h * GROUP + r % GROUP
        pos = seq - n + j
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM  # constexpr: folds away when BLOCK_D == HEAD_DIM (vector loads)
        q = tl.load(q_ptr + (q0 + j)[:, None] * stride_qt + qh[:, None] * stride_qh
                    + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        acc = tl.zeros([ROWS], tl.float32)
        hi = tl.minimum(lo + split_len, seq)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            t_ok = t < hi
            k, _ = load_key_tile(k_ptr, bt_ptr + b * stride_bt, h, t, t_ok, d, d_ok,
                                 stride_kb, stride_kh, stride_ks, stride_kd, PAGE)
            s = qk_logits(q, k, scale_log2, DOT_FP32)
            ok = row_ok[:, None] & t_ok[None, :] & (t[None, :] <= pos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # A row with no visible key yet keeps max=-inf; shift by 0 so exp2 gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - shift) + tl.sum(tl.exp2(s - shift[:, None]), axis=1)
            m = m_new
        out = split * stride_ps + (q0 + j) * stride_pt + h * GROUP + r % GROUP
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, acc, mask=row_ok)


@triton.jit
def _lse_merge_kernel(
    q_start_ptr, seq_lens_ptr, m_ptr, l_ptr, lse_ptr,
    stride_ps, stride_pt, stride_lt, split_len,
    GROUP: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1) // ROW_BLOCKS
    rb = tl.program_id(1) % ROW_BLOCKS
    seq = tl.load(seq_lens_ptr + b)
    q0 = tl.load(q_start_ptr + b)
    n = tl.load(q_start_ptr + b + 1) - q0
    r = rb * ROWS + tl.arange(0, ROWS)
    j = r // GROUP
    row_ok = j < n
    if (seq > 0) & (rb * ROWS < n * GROUP):
        col = (q0 + j) * stride_pt + h * GROUP + r % GROUP
        m = tl.full([ROWS], float("-inf"), tl.float32)
        acc = tl.zeros([ROWS], tl.float32)
        for split in range(0, tl.cdiv(seq, split_len)):
            m_s = tl.load(m_ptr + split * stride_ps + col, mask=row_ok, other=float("-inf"))
            l_s = tl.load(l_ptr + split * stride_ps + col, mask=row_ok, other=0.0)
            m_new = tl.maximum(m, m_s)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - shift) + l_s * tl.exp2(m_s - shift)
            m = m_new
        acc = tl.where(row_ok, acc, 1.0)  # padding rows: no log2(0)
        tl.store(lse_ptr + (q0 + j) * stride_lt + h * GROUP + r % GROUP, m + tl.log2(acc),
                 mask=row_ok)


def paged_lse(query: torch.Tensor, query_start: torch.Tensor, key_view: torch.Tensor,
              block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
              max_queries: int, max_seq_len: int | None = None, split_len: int = 2048,
              block_n: int = 64, rows: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Base-2 LSE [T, q_heads] (float32) of every query row of `query` [T, q_heads, D].

    max_queries: the most queries any request has (n_b); max_seq_len: max(seq_lens), passed
    from the host so the launch needs no device sync (CUDA graphs); read from seq_lens if None.
    Two launches: the partials per split, then their merge (no torch ops in between, which at
    short contexts would cost more than the kernels)."""
    check_kv_view(key_view, "key_view")
    total, q_heads, dim = query.shape
    kv_heads, page = key_view.shape[1], key_view.shape[2]
    group = q_heads // kv_heads
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    splits = max(1, cdiv(max_seq_len, split_len))
    rows = max(16, min(next_pow2(rows), next_pow2(max_queries * group)))
    row_blocks = max(1, cdiv(max_queries * group, rows))
    m = torch.empty((splits, total, q_heads), dtype=torch.float32, device=query.device)
    s = torch.empty_like(m)
    lse = torch.empty((total, q_heads), dtype=torch.float32, device=query.device)
    grid = (seq_lens.shape[0], kv_heads * row_blocks, splits)
    _lse_partial_kernel[grid](
        query, query_start, key_view, block_table, seq_lens, m, s,
        *query.stride(), *key_view.stride(), block_table.stride(0), m.stride(0), m.stride(1),
        scale * LOG2E, split_len,
        HEAD_DIM=dim, PAGE=page, GROUP=group, ROWS=rows, ROW_BLOCKS=row_blocks, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(dim)), DOT_FP32=use_fp32_dot(query.dtype, key_view.dtype),
        num_warps=num_warps,
    )
    _lse_merge_kernel[grid[:2]](
        query_start, seq_lens, m, s, lse, m.stride(0), m.stride(1), lse.stride(0), split_len,
        GROUP=group, ROWS=rows, ROW_BLOCKS=row_blocks, num_warps=1,
    )
    return lse
