"""In-place per-head compaction (Triton): for each request, gather the kept slots of K, V and the
score buffer to the dense front of the request's own pages, in the order given, and zero the
rest of the last kept page (see compaction.py for the torch reference and why the tail must be
finite).

Why in place is safe here without a temporary copy
--------------------------------------------------
keep[h] is strictly ascending, so keep[h, j] >= j: every entry moves towards the front or stays.
The grid is (requests, kv_heads, parts), where a part is one BLOCK_D-wide slice of the head
dimension of K or of V, or the head's scores. Then:
  1. Programs never share memory: each reads and writes only its own (request, head, tensor,
     dim slice), and requests own disjoint pages (an evicting request never shares prefix-cache
     pages). So no ordering between programs is needed.
  2. Inside a program, destinations are visited in chunks of BLOCK_T in ascending order. Chunk c
     writes destinations [c*T, c*T + T) and reads sources keep[c*T ..] >= c*T. A later chunk
     c' > c reads only sources >= c'*T >= (c + 1)*T, which no earlier chunk wrote; so every
     read sees the original data, whatever the overlap.
  3. Within a chunk a source may be another lane's destination (keep[j] = j' with j < j' in the
     same chunk), so all of the chunk's loads complete before any of its stores, and so before
     any later chunk's stores: a CTA barrier (tl.debug_barrier) sits between them. Prefetching
     later chunks' loads earlier (software pipelining) stays safe by 2, since those sources lie
     beyond every pending store.
  4. The tail [P, end of the last kept page) is only ever a source, and is zeroed after a final
     barrier, once every load of the program is done.
A naive fully parallel gather-scatter (one program per destination tile) would race: a tile can
overwrite a slot that a lower tile has not read yet. Gather-to-temporary then scatter would be
safe too but moves every byte twice. Entries that stay in place (keep[j] == j, the common long
prefix) are skipped, so the traffic is only what actually moves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_evict.kernels.compaction import compact_request_reference
from vllm_evict.kernels.paged import check_kv_view, check_score_view, next_pow2

__all__ = ["compact", "compact_request", "compact_request_reference"]


@triton.jit
def _compact_rows(ptr, stride_b, stride_h, stride_s, stride_d, bt_row_ptr, keep_row_ptr,
                  kept, h, d0, WIDTH: tl.constexpr, PAGE: tl.constexpr,
                  PAGE_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    d_ok = d < WIDTH  # constexpr: folds away when BLOCK_D divides WIDTH (vector loads)
    for start in range(0, kept, BLOCK_T):
        j = start + tl.arange(0, BLOCK_T)
        src = tl.load(keep_row_ptr + j, mask=j < kept, other=0)
        moved = (j < kept) & (src != j)
        src_page = tl.load(bt_row_ptr + src // PAGE, mask=moved, other=0).to(tl.int64)
        dst_page = tl.load(bt_row_ptr + j // PAGE, mask=moved, other=0).to(tl.int64)
        mask = moved[:, None] & d_ok[None, :]
        x = tl.load(ptr + src_page[:, None] * stride_b + h * stride_h
                    + (src % PAGE)[:, None] * stride_s + d[None, :] * stride_d, mask=mask)
        tl.debug_barrier()  # every load of this chunk lands before any store (point 3 above)
        tl.store(ptr + dst_page[:, None] * stride_b + h * stride_h
                 + (j % PAGE)[:, None] * stride_s + d[None, :] * stride_d, x, mask=mask)
    tl.debug_barrier()  # the tail was a source until here (point 4)
    t = kept + tl.arange(0, PAGE_PAD)
    t_ok = t < tl.cdiv(kept, PAGE) * PAGE
    page = tl.load(bt_row_ptr + t // PAGE, mask=t_ok, other=0).to(tl.int64)
    zero = tl.zeros([PAGE_PAD, BLOCK_D], ptr.dtype.element_ty)
    tl.store(ptr + page[:, None] * stride_b + h * stride_h + (t % PAGE)[:, None] * stride_s
             + d[None, :] * stride_d, zero, mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _compact_kernel(
    k_ptr, v_ptr, s_ptr, bt_ptr, keep_ptr, kept_ptr,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_sb, stride_sh, stride_ss, stride_bt, stride_keep_r, stride_keep_h,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, PAGE_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SPLITS: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)
    kept = tl.load(kept_ptr + r)
    bt_row = bt_ptr + r * stride_bt
    keep_row = keep_ptr + r * stride_keep_r + h * stride_keep_h
    if part < D_SPLITS:
        _compact_rows(k_ptr, stride_kb, stride_kh, stride_ks, stride_kd, bt_row, keep_row, kept,
                      h, part * BLOCK_D, HEAD_DIM, PAGE, PAGE_PAD, BLOCK_T, BLOCK_D)
    elif part < 2 * D_SPLITS:
        _compact_rows(v_ptr, stride_vb, stride_vh, stride_vs, stride_vd, bt_row, keep_row, kept,
                      h, (part - D_SPLITS) * BLOCK_D, HEAD_DIM, PAGE, PAGE_PAD, BLOCK_T, BLOCK_D)
    else:  # the score buffer: a [blocks, heads, page] tensor is one of width 1
        _compact_rows(s_ptr, stride_sb, stride_sh, stride_ss, 0, bt_row, keep_row, kept,
                      h, 0, 1, PAGE, PAGE_PAD, BLOCK_T, 1)


def compact(key_view: torch.Tensor, value_view: torch.Tensor, scores: torch.Tensor | None,
            block_table: torch.Tensor, keep: torch.Tensor, num_kept: torch.Tensor, *,
            block_t: int = 128, block_d: int = 32, num_warps: int = 4) -> None:
    """Compact R requests at once, in place.

    key_view, value_view: [blocks, kv_heads, page, D] views (any strides); scores: float32
    [blocks, kv_heads, page] view or None; block_table [R, max_pages]: each request's pages in
    order (requests must not share pages); keep [R, kv_heads, P_max] (int32/int64): per head
    strictly ascending physical positions to keep, first num_kept[r] entries used; num_kept [R]
    int32. Indices must be < the request's held length (not checked: that needs a sync)."""
    check_kv_view(key_view, "key_view")
    check_kv_view(value_view, "value_view")
    if key_view.shape != value_view.shape:
        raise ValueError(f"K and V views differ: {tuple(key_view.shape)} vs {tuple(value_view.shape)}")
    if scores is not None:
        check_score_view(scores, key_view)
    requests = block_table.shape[0]
    _, kv_heads, page, dim = key_view.shape
    if requests == 0:
        return
    block_d = min(next_pow2(block_d), next_pow2(dim))
    splits = triton.cdiv(dim, block_d)
    score_arg = scores if scores is not None else key_view  # never read without scores
    score_strides = scores.stride() if scores is not None else (0, 0, 0)
    grid = (requests, kv_heads, 2 * splits + (scores is not None))
    _compact_kernel[grid](
        key_view, value_view, score_arg, block_table, keep, num_kept,
        *key_view.stride(), *value_view.stride(), *score_strides, block_table.stride(0),
        keep.stride(0), keep.stride(1),
        HEAD_DIM=dim, PAGE=page, PAGE_PAD=next_pow2(page), BLOCK_T=block_t, BLOCK_D=block_d, D_SPLITS=splits,
        num_warps=num_warps,
    )


def compact_request(key_view: torch.Tensor, value_view: torch.Tensor,
                    scores: torch.Tensor | None, block_ids: torch.Tensor, keep: torch.Tensor,
                    **kwargs: int) -> None:
    """One request, with compact_request_reference's arguments: block_ids [n] the request's
    pages in order, keep [kv_heads, P] ascending per head."""
    kept = torch.full((1,), keep.shape[1], dtype=torch.int32, device=keep.device)
    compact(key_view, value_view, scores, block_ids[None], keep[None], kept, **kwargs)



def batch_tables(block_ids: list[torch.Tensor], keep: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compact()'s block_table [R, max_pages], keep [layers, R, kv_heads, P_max] and num_kept
    [R] for the requests of one step (block_ids[r] [n_r]: request r's pages in order; keep[r]
    [layers, kv_heads, P_r] ascending per head), built once and used by every layer's launch."""
    device = keep[0].device
    table = torch.zeros(len(block_ids), max(len(b) for b in block_ids), dtype=torch.int32,
                        device=device)
    layers, heads, _ = keep[0].shape
    kept = torch.zeros(layers, len(keep), heads, max(k.shape[-1] for k in keep),
                       dtype=torch.int64, device=device)
    for r, (ids, k) in enumerate(zip(block_ids, keep, strict=True)):
        table[r, : len(ids)] = ids
        kept[:, r, :, : k.shape[-1]] = k
    counts = torch.tensor([k.shape[-1] for k in keep], dtype=torch.int32, device=device)
    return table, kept, counts
