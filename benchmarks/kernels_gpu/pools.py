"""Synthetic paged pools in vLLM 0.32's GPU cache layout, and the decode-step baseline."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.kernels_gpu import HEAD_DIM, KV_HEADS, PAGE, Q_HEADS

# ---------------------------------------------------------------- synthetic paged pools

@dataclass
class Pool:
    batch: int
    context: int
    cache: torch.Tensor  # stored [blocks, page, kv_heads, 2 * D]: K then V
    key: torch.Tensor  # [blocks, kv_heads, page, D] views
    value: torch.Tensor
    table: torch.Tensor  # [B, pages] int32, shuffled
    seq_lens: torch.Tensor
    scores: torch.Tensor  # [blocks, page, kv_heads] float32

    @property
    def score_view(self) -> torch.Tensor:
        return self.scores.permute(0, 2, 1)

    def dense(self, which: int) -> torch.Tensor:
        """Request b owns blocks b*P .. (b+1)*P - 1 in this view (no copy): [B, S, kv_heads, D]."""
        rows = self.cache.view(self.batch, -1, KV_HEADS, 2 * HEAD_DIM)
        return rows[..., which * HEAD_DIM:(which + 1) * HEAD_DIM]


def kv_views(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [blocks, kv_heads, page, D] of a cache stored [blocks, page, kv_heads, 2 * D]
    (vLLM's logical [blocks, kv_heads, page, 2 * D] in NHD order), as layouts.gpu_views."""
    logical = stored.transpose(1, 2)
    return logical[..., :HEAD_DIM], logical[..., HEAD_DIM:]


def make_pool(batch: int, context: int, dtype: torch.dtype, device: torch.device,
              g: torch.Generator) -> Pool:
    pages = math.ceil(context / PAGE)
    cache = torch.empty(batch * pages, PAGE, KV_HEADS, 2 * HEAD_DIM, dtype=dtype, device=device)
    cache.normal_(generator=g)
    key, value = kv_views(cache)
    table = torch.randperm(batch * pages, device=device, generator=g).view(batch, pages).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scores = torch.rand(batch * pages, PAGE, KV_HEADS, device=device, generator=g)
    return Pool(batch, context, cache, key, value, table, seq_lens, scores)


def pool_bytes(batch: int, context: int, dtype: torch.dtype, keep_fraction: float) -> int:
    tokens = batch * math.ceil(context / PAGE) * PAGE
    per_token = 2 * KV_HEADS * HEAD_DIM * dtype.itemsize + KV_HEADS * 4  # K, V, scores
    keep = batch * KV_HEADS * int(context * keep_fraction) * 4
    window = batch * KV_HEADS * context * 4  # the pooling scratch
    return tokens * per_token + keep + window


def keep_indices(pool: Pool, keep_fraction: float, g: torch.Generator) -> torch.Tensor:
    """Per (request, head): the first 4 (sink) and last 64 (recent) positions and a random
    subset of the rest, sorted (the shape h2o/snapkv selections have)."""
    kept = int(pool.context * keep_fraction)
    noise = torch.rand(pool.batch, KV_HEADS, pool.context, device=pool.cache.device, generator=g)
    noise[..., :4] = 2
    noise[..., -64:] = 2
    return noise.topk(kept, dim=-1).indices.sort(dim=-1).values.int()


# ---------------------------------------------------------------- the decode-step baseline

def decode_step(pool: Pool, query: torch.Tensor, scale: float) -> tuple[Callable[[], Any], str, torch.Tensor | None]:
    """A decode attention step over the pool's cache: (fn, name, natural-log LSE or None)."""
    q4 = query.view(pool.batch, 1, Q_HEADS, HEAD_DIM)
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    if flash_attn_with_kvcache is not None and pool.cache.is_cuda:
        k, v = pool.dense(0), pool.dense(1)

        def fa() -> Any:
            return flash_attn_with_kvcache(q4, k, v, cache_seqlens=pool.seq_lens,
                                           softmax_scale=scale)

        _, lse = flash_attn_with_kvcache(q4, k, v, cache_seqlens=pool.seq_lens,
                                         softmax_scale=scale, return_softmax_lse=True)
        return fa, "flash_attn.flash_attn_with_kvcache", lse[:, :, 0]

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt = query.view(pool.batch, Q_HEADS, 1, HEAD_DIM)
    k, v = pool.dense(0).transpose(1, 2), pool.dense(1).transpose(1, 2)  # [B, kv, S, D] views
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        def step(backend: SDPBackend = backend) -> Any:
            with sdpa_kernel([backend]):
                return sdpa(qt, k, v, scale=scale, enable_gqa=True)
        try:
            step()
        except RuntimeError:
            continue
        return step, f"torch sdpa ({backend.name}, enable_gqa)", None
    raise RuntimeError("no SDPA backend runs a GQA decode step here")
