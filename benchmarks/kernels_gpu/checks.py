"""Every kernel against its torch reference on a small ragged batch, on the device."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.kernels_gpu import HEAD_DIM, KV_HEADS, PAGE, POOL, Q_HEADS
from benchmarks.kernels_gpu.pools import kv_views, make_pool

# ---------------------------------------------------------------- correctness on the device

def check_against_references(k: dict[str, Any], dtype: torch.dtype, device: torch.device,
                             g: torch.Generator) -> dict[str, Any]:
    """Each kernel vs its torch reference on a small ragged batch (lengths 1, 100, 333)."""
    lens = [1, 100, 333]
    pools = [make_pool(1, n, dtype, device, g) for n in lens]
    # One pool with three requests: concatenate the per-request tables over one cache.
    pages = [p.table.shape[1] for p in pools]
    cache = torch.cat([p.cache for p in pools], dim=0)
    offsets = torch.tensor([0, *pages[:-1]]).cumsum(0).tolist()
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32, device=device)
    for r, (p, off) in enumerate(zip(pools, offsets, strict=True)):
        table[r, :pages[r]] = p.table[0] + off
    key, value = kv_views(cache)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scores = torch.rand(cache.shape[0], PAGE, KV_HEADS, device=device, generator=g)
    scale = HEAD_DIM ** -0.5
    query = torch.randn(len(lens), Q_HEADS, HEAD_DIM, device=device, generator=g).to(dtype)
    counts = [1, 64, 64]
    starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
    wquery = torch.randn(sum(counts), Q_HEADS, HEAD_DIM, device=device, generator=g).to(dtype)
    out: dict[str, Any] = {}

    def compare(name: str, run: Callable[[torch.Tensor], None],
                ref: Callable[[torch.Tensor], None], exact: bool = False) -> None:
        got, want = scores.clone(), scores.clone()
        run(got.permute(0, 2, 1))
        ref(want.permute(0, 2, 1))
        err = (got - want).abs().max().item()
        ok = err == 0 if exact else bool(torch.allclose(got, want, rtol=1e-3, atol=1e-4))
        out[name] = {"ok": ok, "max_abs_err": err}

    for mode in ("accumulate", "overwrite"):
        compare(f"decode_scores/{mode}",
                lambda s, mode=mode: k["decode"].decode_scores(query, key, table, seq_lens, scale, s, mode),
                lambda s, mode=mode: k["decode"].decode_scores_reference(query, key, table, seq_lens, scale, s, mode))
    compare("window_scores/overwrite-pool5",
            lambda s: k["window"].window_scores(wquery, starts, key, table, seq_lens, scale, s,
                                                "overwrite", POOL),
            lambda s: k["window"].window_scores_paged_reference(wquery, starts, key, table,
                                                                seq_lens, scale, s, "overwrite", POOL))
    compare("keydiff_scores",
            lambda s: k["keydiff"].keydiff_scores(key, table, seq_lens, s),
            lambda s: k["keydiff"].keydiff_scores_paged_reference(key, table, seq_lens, s))

    kept = [1, 60, 200]
    keep = torch.zeros(len(lens), KV_HEADS, max(kept), dtype=torch.int64, device=device)
    for r, (n, p) in enumerate(zip(lens, kept, strict=True)):
        keep[r, :, :p] = torch.stack([torch.randperm(n, device=device, generator=g)[:p].sort().values
                                      for _ in range(KV_HEADS)])
    want_cache, want_scores = cache.clone(), scores.clone()
    k["compaction"].compact(key, value, scores.permute(0, 2, 1), table, keep,
                            torch.tensor(kept, dtype=torch.int32, device=device))
    wk, wv = kv_views(want_cache)
    for r, (n, p) in enumerate(zip(lens, kept, strict=True)):
        k["compaction"].compact_request_reference(
            [wk, wv, want_scores.permute(0, 2, 1).unsqueeze(-1)],
            table[r, :math.ceil(n / PAGE)].long(), keep[r, :, :p])
    out["compaction"] = {"ok": bool(torch.equal(cache, want_cache) and torch.equal(scores, want_scores))}
    return out
