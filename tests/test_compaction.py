"""Compaction (torch reference); the CPU cache layouts are tested in test_layouts.py."""

from __future__ import annotations

import pytest
import torch

from vllm_evict.kernels.compaction import compact_request_reference


def _naive(key, value, block_ids, keep):
    """Per-token loop: the obviously right answer."""
    bs = key.shape[2]
    k, v = key.clone(), value.clone()
    for h in range(keep.shape[0]):
        for dst, src in enumerate(keep[h].tolist()):
            k[block_ids[dst // bs], h, dst % bs] = key[block_ids[src // bs], h, src % bs]
            v[block_ids[dst // bs], h, dst % bs] = value[block_ids[src // bs], h, src % bs]
    kept = keep.shape[1]
    for t in range(kept, -(-kept // bs) * bs):
        k[block_ids[t // bs], :, t % bs] = 0
        v[block_ids[t // bs], :, t % bs] = 0
    return k, v


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("heads, bs", [(1, 16), (2, 32), (4, 8)])
def test_matches_naive_loop_with_overlap_and_ragged_tail(seed, heads, bs):
    g = torch.Generator().manual_seed(seed)
    num_blocks, dim = 12, 8
    key, value = torch.randn(num_blocks, heads, bs, dim, generator=g), torch.randn(
        num_blocks, heads, bs, dim, generator=g)
    pages = 5
    block_ids = torch.randperm(num_blocks, generator=g)[:pages]  # non-contiguous pages
    held = pages * bs - int(torch.randint(0, bs, (1,), generator=g))
    kept = int(torch.randint(1, held, (1,), generator=g))
    keep = torch.stack([torch.randperm(held, generator=g)[:kept].sort().values
                        for _ in range(heads)])
    want_k, want_v = _naive(key, value, block_ids, keep)
    compact_request_reference([key, value], block_ids, keep)
    assert torch.equal(key, want_k) and torch.equal(value, want_v)


def test_other_requests_pages_are_untouched():
    key, value = torch.randn(6, 2, 4, 3), torch.randn(6, 2, 4, 3)
    before_k, before_v = key.clone(), value.clone()
    block_ids = torch.tensor([4, 1])
    compact_request_reference([key, value], block_ids, torch.tensor([[0, 5, 7], [1, 2, 6]]))
    others = [0, 2, 3, 5]
    assert torch.equal(key[others], before_k[others]) and torch.equal(value[others], before_v[others])
