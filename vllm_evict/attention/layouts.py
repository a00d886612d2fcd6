"""Uniform views of vLLM's paged KV caches: K and V as [blocks, kv_heads, slot, head_dim].

Compaction and scoring are written once against these views; only this file knows how each
backend lays out its cache tensor. Supported:
  CPU_ATTN ("vec"/"vec16"/... ISAs): [blocks, kv_heads, block_size, 2*head_dim]; per (block, head)
      the K half is stored transposed ([head_dim, block_size]) or row-major depending on the
      ISA, so we probe it once with the real cache-write op; V is row-major.
  FLASH_ATTN / TRITON_ATTN (GPU, vLLM 0.32): logical [blocks, kv_heads, block_size,
      2*head_dim], K then V in the last dim, in any physical stride order
      (VLLM_KV_CACHE_LAYOUT); K and V are its two halves. Kernel blocks smaller than the
      scheduler's blocks (a cache with more rows than blocks) are not supported.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_key_is_transposed(dtype: torch.dtype, block_size: int, head_size: int) -> bool:
    """Write known keys with the CPU backend's own op and see where they land."""
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
    rows = cache.view(1, 1, 2 * block_size, head_size)
    key_cache, value_cache = rows.chunk(2, dim=2)
    # Small integers are exact in every float dtype, so equality is a fair test.
    key = (torch.arange(block_size * head_size) % 199 + 1).reshape(block_size, 1, head_size)
    key = key.to(dtype)
    value = -key
    slots = torch.arange(block_size, dtype=torch.int64)
    torch.ops._C.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    k_half, v_half = rows[0, 0, :block_size], rows[0, 0, block_size:]
    if not torch.equal(v_half, value[:, 0]):
        raise NotImplementedError(f"vllm-evict: unknown V layout for CPU attention ISA {isa!r}")
    if torch.equal(k_half, key[:, 0]):
        return False
    if torch.equal(k_half.reshape(head_size, block_size).t(), key[:, 0]):
        return True
    raise NotImplementedError(f"vllm-evict: unknown K layout for CPU attention ISA {isa!r}")


def cpu_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    rows = kv_cache.view(num_blocks, num_heads, 2 * block_size, head_size)
    key, value = rows[:, :, :block_size], rows[:, :, block_size:]
    if cpu_key_is_transposed(kv_cache.dtype, block_size, head_size):
        key = key.reshape(num_blocks, num_heads, head_size, block_size).transpose(-1, -2)
    assert key.data_ptr() == kv_cache.data_ptr(), "K view must alias the cache"
    return key, value


def gpu_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # [blocks, heads, block_size, 2 * dim] -> two [blocks, heads, block_size, dim] views
    head_size = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


def kv_views(kv_cache: torch.Tensor, is_cpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_views(kv_cache) if is_cpu else gpu_views(kv_cache)
