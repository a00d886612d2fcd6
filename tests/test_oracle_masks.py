"""The oracle's reconstruction of what each query could see."""

from __future__ import annotations

import torch

from vllm_evict.oracle import allowed_positions


def test_before_any_compaction_it_is_causal():
    allowed = allowed_positions(6, [], layers=1, kv_heads=1)[0, 0]
    assert torch.equal(allowed, torch.ones(6, 6, dtype=torch.bool).tril())


def test_after_a_compaction_queries_see_kept_plus_new_tokens():
    records = [{"logical_len": 5, "kept": [[[0, 3, 4]], [[1, 2, 4]]]}]
    allowed = allowed_positions(8, records, layers=2, kv_heads=1)
    assert allowed[0, 0, 4].tolist() == [True] * 5 + [False] * 3  # before: causal
    assert allowed[0, 0, 5].nonzero().flatten().tolist() == [0, 3, 4, 5]
    assert allowed[0, 0, 7].nonzero().flatten().tolist() == [0, 3, 4, 5, 6, 7]
    assert allowed[1, 0, 6].nonzero().flatten().tolist() == [1, 2, 4, 5, 6]
