"""Uniform views of vLLM's paged KV caches: K and V as [blocks, kv_heads, slot, head_dim].

Compaction and scoring are written once against these views; only this file knows how each
backend lays out its cache tensor. Supported:
  CPU_ATTN, every ISA vLLM's CPU backend picks (amx, vec, vec16, and the non-x86 ones): the
      cache is [blocks, kv_heads, block_size, 2*head_dim] and each ISA packs K and V inside a
      (block, head) tile its own way (vec: K transposed, V row-major; amx: VNNI-style pairs in
      16-token tiles). Rather than hard-code any of them, `probe_cpu_layout` writes known K/V
      with vLLM's own cache-write op for the ISA the engine uses and records where every
      (token, dim) element lands. Strided layouts become plain tensor views; any other
      permutation becomes a `MappedPagedView` that gathers and scatters through that map.
      The probe runs when the KV cache is initialised, so an unknown layout stops the engine
      at start, never at the first compaction.
  FLASH_ATTN / TRITON_ATTN (GPU, vLLM 0.32): logical [blocks, kv_heads, block_size,
      2*head_dim], K then V in the last dim, in any physical stride order
      (VLLM_KV_CACHE_LAYOUT); K and V are its two halves. Kernel blocks smaller than the
      scheduler's blocks (a cache with more rows than blocks) are not supported.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from vllm_evict.kernels.paged import MappedPagedView

# Debug switch: "mapped" addresses every CPU layout through its probed index map, even where a
# strided view exists. The tests use it to run the AMX code path on CPUs without AMX.
LAYOUT_ENV = "VLLM_EVICT_CPU_LAYOUT"

# Probe values are the base-64 digits of each element's index, plus one: small integers, exact
# in every float dtype the cache may have, and never 0 (0 marks an element the op left alone).
_DIGIT_BASE = 64


class UnsupportedLayoutError(NotImplementedError):
    """The attention backend stores K/V in a way compaction cannot address."""


@dataclass(frozen=True)
class CpuTileLayout:
    """Where the CPU cache-write op puts K[token, dim] and V[token, dim] inside one
    (block, head) tile of 2 * block_size * head_size elements."""

    isa: str
    key_index: torch.Tensor  # [block_size, head_size] int64 offsets in the tile
    value_index: torch.Tensor  # [block_size, head_size] int64

    @property
    def key_transposed(self) -> bool | None:
        """True/False for the two strided K layouts (V row-major after K); None otherwise."""
        bs, dim = self.key_index.shape
        tok, d = torch.arange(bs)[:, None], torch.arange(dim)[None, :]
        if not torch.equal(self.value_index, bs * dim + tok * dim + d):
            return None
        if torch.equal(self.key_index, tok * dim + d):
            return False
        if torch.equal(self.key_index, d * bs + tok):
            return True
        return None


def write_with_cpu_op(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slots: torch.Tensor, isa: str) -> None:
    """Write key/value [tokens, heads, dim] at `slots` exactly as vLLM's CPU backend does."""
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    num_blocks, heads, block_size, two_d = kv_cache.shape
    rows = kv_cache.view(num_blocks, heads, 2 * block_size, two_d // 2)
    key_cache, value_cache = rows.chunk(2, dim=2)
    torch.ops._C.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


@functools.cache
def probe_cpu_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> CpuTileLayout:
    """Find the tile layout of `isa` by writing known values with the real op."""
    n = block_size * head_size
    index = torch.arange(n)
    tile = 2 * n
    key_at = torch.zeros(tile, dtype=torch.int64)  # element index stored at each tile offset
    value_at = torch.zeros(tile, dtype=torch.int64)
    is_key = is_value = None
    place = 1
    while True:
        digit = (index // place) % _DIGIT_BASE + 1
        cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        key = digit.reshape(block_size, 1, head_size).to(dtype)
        try:
            write_with_cpu_op(key, -key, cache, torch.arange(block_size), isa)
        except RuntimeError as exc:
            raise UnsupportedLayoutError(
                f"vllm-evict: vLLM's CPU cache-write op rejects ISA {isa!r} for {dtype}, "
                f"block size {block_size}, head size {head_size}: {exc}") from None
        flat = cache.reshape(-1).to(torch.float32)
        if is_key is None:
            is_key, is_value = flat > 0, flat < 0
        key_at += (flat.clamp(min=0).long() - 1).clamp(min=0) * place
        value_at += ((-flat).clamp(min=0).long() - 1).clamp(min=0) * place
        place *= _DIGIT_BASE
        if place >= n:
            break
    offsets = torch.arange(tile)
    maps = []
    for name, mask, at in (("K", is_key, key_at), ("V", is_value, value_at)):
        found = torch.full((n,), -1, dtype=torch.int64)
        found[at[mask]] = offsets[mask]
        if int(mask.sum()) != n or bool((found < 0).any()):
            raise UnsupportedLayoutError(
                f"vllm-evict: unknown {name} layout for CPU attention ISA {isa!r} ({dtype}, "
                f"block size {block_size}, head size {head_size}): the cache-write op does not "
                "store each element exactly once inside its (block, head) tile")
        maps.append(found.reshape(block_size, head_size))
    return CpuTileLayout(isa, maps[0], maps[1])


def cpu_views(kv_cache: torch.Tensor, isa: str):
    """(K, V) as [blocks, kv_heads, block_size, head_dim]: tensor views for strided layouts,
    MappedPagedView for packed ones. Both alias the cache."""
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    layout = probe_cpu_layout(kv_cache.dtype, block_size, head_size, isa)
    transposed = layout.key_transposed
    if transposed is None or os.environ.get(LAYOUT_ENV) == "mapped":
        tiles = kv_cache.view(num_blocks, num_heads, 2 * block_size * head_size)
        return (MappedPagedView(tiles, layout.key_index.to(kv_cache.device)),
                MappedPagedView(tiles, layout.value_index.to(kv_cache.device)))
    rows = kv_cache.view(num_blocks, num_heads, 2 * block_size, head_size)
    key, value = rows[:, :, :block_size], rows[:, :, block_size:]
    if transposed:
        key = key.reshape(num_blocks, num_heads, head_size, block_size).transpose(-1, -2)
    assert key.data_ptr() == kv_cache.data_ptr(), "K view must alias the cache"
    return key, value


def gpu_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # [blocks, heads, block_size, 2 * dim] -> two [blocks, heads, block_size, dim] views
    head_size = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_size], kv_cache[..., head_size:]
