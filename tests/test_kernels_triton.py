"""The Triton kernels of kernels/ against their torch references, under Triton's CPU interpreter.

Every case runs on seeded random inputs over a synthetic paged pool: ragged lengths (1, a whole
number of pages, partial last pages), shuffled block tables, GQA ratios 1/4/8, head sizes
64/96/128, fp16/bf16/fp32 caches and three cache layouts (vLLM's GPU FlashAttention layout, and
the CPU backend's with K row-major or transposed). Outputs are poisoned with NaN first, so an
element a kernel should have written but did not shows up, and a page the kernel must not touch
(other requests' pages, a NaN-filled page that padding block-table entries point to) is
compared bit for bit. Shapes are tiny and tiles small (several tiles, splits and row blocks per
request) because the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import sys

# Before triton is imported: @triton.jit decorates into interpreted functions only when this is
# set at decoration time (kernel modules or triton imported earlier in this process are
# imported afresh below). It is restored once the kernels are imported and set again only while
# this module's tests run (the interpreter reads it at launch too), so that engine subprocesses
# started by other test modules on a GPU machine do not inherit it. (So tests/conftest.py needs
# no TRITON_INTERPRET, which would leak into those subprocesses.)
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
for _name in [m for m in sys.modules if m.startswith("vllm_evict.kernels.triton_")]:
    del sys.modules[_name]
_std = sys.modules.get("triton.language.standard")
if _std is not None and type(_std.zeros).__name__ != "InterpretedFunction":
    # triton.language itself was imported before this point (e.g. by vLLM): its own @jit
    # helpers (tl.zeros, tl.cdiv, ...) were decorated for the compiler, and the interpreter
    # refuses to call those. Import triton's Python modules afresh; its C extension stays
    # loaded (it cannot be loaded twice). Not needed in the suite as it stands.
    for _name in [m for m in sys.modules
                  if m.split(".")[0] == "triton" and not m.startswith("triton._C")]:
        del sys.modules[_name]

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vllm_evict.core import observation as stats  # noqa: E402
from vllm_evict.host.attention.layouts import gpu_views  # noqa: E402
from vllm_evict.kernels.paged import cdiv, paged_index  # noqa: E402
from vllm_evict.kernels.triton_compaction import compact, compact_request_reference  # noqa: E402
from vllm_evict.kernels.triton_decode_scores import (  # noqa: E402
    decode_scores,
    decode_scores_reference,
)
from vllm_evict.kernels.triton_keydiff import (  # noqa: E402
    keydiff_scores,
    keydiff_scores_paged_reference,
)
from vllm_evict.kernels.triton_lse import LOG2E, paged_lse  # noqa: E402
from vllm_evict.kernels.triton_window_scores import (  # noqa: E402
    window_scores,
    window_scores_paged_reference,
)

if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.fixture(autouse=True, scope="module")
def _interpret() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
SCALE_TOL = {"rtol": 1e-4, "atol": 2e-5}


# ---------------------------------------------------------------- synthetic paged pools

@dataclass
class Pool:
    key: torch.Tensor  # [blocks, kv_heads, page, D] views of `cache`
    value: torch.Tensor
    cache: torch.Tensor
    scores: torch.Tensor  # the runner's float32 [blocks, page, kv_heads] buffer
    block_table: torch.Tensor  # [B, max_pages] int32, shuffled
    seq_lens: torch.Tensor  # [B] int32
    owned: torch.Tensor  # [blocks, page] bool: slots of held positions
    poison_page: int

    @property
    def score_view(self) -> torch.Tensor:
        return self.scores.permute(0, 2, 1)  # [blocks, kv_heads, page]


def new_cache(layout: str, blocks: int, page: int, kv_heads: int, dim: int,
              dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if layout == "flash":  # vLLM 0.32 GPU FlashAttention / Triton, stored NHD
        shape = (blocks, page, kv_heads, 2 * dim)
    else:  # CPU attention: [blocks, kv_heads, 2 * page, D] rows, K first
        shape = (blocks, kv_heads, 2 * page, dim)
    return torch.randn(shape, generator=g).to(dtype)


def views_of(layout: str, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V views [blocks, kv_heads, page, D] aliasing `cache`, as layouts.py builds them."""
    if layout == "flash":  # logical [blocks, kv_heads, page, 2 * D], K then V
        return gpu_views(cache.transpose(1, 2))
    blocks, kv_heads, two_page, dim = cache.shape
    page = two_page // 2
    key, value = cache[:, :, :page], cache[:, :, page:]
    if layout == "cpu_t":  # the `vec` ISAs store each (block, head) K as [D, page]
        key = key.reshape(blocks, kv_heads, dim, page).transpose(-1, -2)
    assert key.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    return key, value


def make_pool(seed: int, layout: str, page: int, kv_heads: int, dim: int, dtype: torch.dtype,
              seq_lens: list[int], spare_pages: int = 3) -> Pool:
    g = torch.Generator().manual_seed(seed)
    pages = [cdiv(s, page) for s in seq_lens]
    blocks = sum(pages) + spare_pages + 1
    cache = new_cache(layout, blocks, page, kv_heads, dim, dtype, g)
    key, value = views_of(layout, cache)
    order = torch.randperm(blocks - 1, generator=g)  # the last block is the poison page
    poison = blocks - 1
    key[poison], value[poison] = float("nan"), float("nan")
    table = torch.full((len(seq_lens), max(pages)), poison, dtype=torch.int32)
    owned = torch.zeros(blocks, page, dtype=torch.bool)
    used = 0
    for b, (n, s) in enumerate(zip(pages, seq_lens, strict=True)):
        table[b, :n] = order[used:used + n].int()
        used += n
        pg, slot = paged_index(table[b], n * page, page)
        owned[pg[:s], slot[:s]] = True
        # Slots past the held length are stale: NaN, so a read of one poisons the result.
        key[pg[s:], :, slot[s:]], value[pg[s:], :, slot[s:]] = float("nan"), float("nan")
    scores = torch.full((blocks, page, kv_heads), float("nan"))
    return Pool(key, value, cache, scores, table, torch.tensor(seq_lens, dtype=torch.int32),
                owned, poison)


def ragged_lens(g: torch.Generator, batch: int, page: int, longest: int) -> list[int]:
    """One token, exactly two pages, and random lengths (mostly partial last pages)."""
    lens = [1, 2 * page] + torch.randint(2, longest, (batch - 2,), generator=g).tolist()
    return [lens[i] for i in torch.randperm(batch, generator=g).tolist()]


def assert_scores(pool: Pool, got: torch.Tensor, want: torch.Tensor, before: torch.Tensor) -> None:
    """Held slots match the reference (NaN there = never written); every other slot, on any
    page, is bit for bit what it was."""
    held = pool.owned
    assert not torch.isnan(got[held]).any(), "a held slot was never written"
    torch.testing.assert_close(got[held], want[held], **SCALE_TOL)
    assert torch.equal(got[~held].view(torch.int32), before[~held].view(torch.int32))


def seeded_scores(pool: Pool, g: torch.Generator, fresh: list[int]) -> None:
    """Accumulate modes read the held scores: give held slots values, but NaN to the `fresh`
    newest positions of each request (they must count as zero) and to every other slot."""
    values = torch.rand(pool.scores.shape, generator=g) * 3
    pool.scores[pool.owned] = values[pool.owned]
    for b, (seq, n) in enumerate(zip(pool.seq_lens.tolist(), fresh, strict=True)):
        pg, slot = paged_index(pool.block_table[b], seq, pool.scores.shape[1])
        pool.scores[pg[seq - n:], slot[seq - n:]] = float("nan")


# ---------------------------------------------------------------- decode scoring

DECODE_CASES = [
    # gqa, dim, dtype, layout, page, mode, backend_lse
    (1, 64, F16, "flash", 16, "accumulate", False),
    (4, 128, BF16, "cpu_t", 16, "overwrite", False),
    (8, 64, F32, "cpu", 32, "accumulate", False),
    (4, 64, F16, "flash", 16, "overwrite", True),
    (8, 128, BF16, "flash", 16, "accumulate", True),
    (1, 128, F32, "cpu_t", 32, "overwrite", False),
    (4, 96, F16, "flash", 16, "accumulate", False),  # a head size that is not a power of 2
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gqa, dim, dtype, layout, page, mode, backend_lse", DECODE_CASES)
def test_decode_scores(seed: int, gqa: int, dim: int, dtype: torch.dtype, layout: str,
                       page: int, mode: str, backend_lse: bool) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    kv_heads = 2 if gqa < 8 else 1
    pool = make_pool(seed, layout, page, kv_heads, dim, dtype, ragged_lens(g, 4, page, 70))
    query = torch.randn(4, kv_heads * gqa, dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(dim)
    if mode == "accumulate":
        seeded_scores(pool, g, [1] * 4)  # the decode token's own slot
    before = pool.scores.clone()
    lse = None
    if backend_lse:  # as FlashAttention returns it: natural log, [q_heads, B] storage
        starts = torch.arange(5, dtype=torch.int32)
        lse2 = paged_lse(query, starts, pool.key, pool.block_table, pool.seq_lens, scale,
                         max_queries=1)
        lse = (lse2 / LOG2E).T.contiguous().T
    decode_scores(query, pool.key, pool.block_table, pool.seq_lens, scale, pool.score_view, mode,
                  lse=lse, block_n=16, split_len=32)
    got, pool.scores = pool.scores, before.clone()
    decode_scores_reference(query, pool.key, pool.block_table, pool.seq_lens, scale,
                            pool.score_view, mode)
    assert_scores(pool, got, pool.scores, before)


# ---------------------------------------------------------------- window scoring

WINDOW_CASES = [
    # gqa, dim, dtype, layout, page, mode, pool_kernel, extra fresh, backend_lse
    (1, 64, F16, "flash", 16, "overwrite", 5, 0, False),
    (4, 128, BF16, "cpu_t", 16, "accumulate", 5, 3, False),
    (8, 64, F32, "cpu", 32, "accumulate", 1, 0, False),
    (4, 64, BF16, "flash", 16, "overwrite", 3, 0, True),
    (8, 128, F16, "flash", 16, "accumulate", 5, 0, False),
    (1, 128, F32, "cpu_t", 16, "overwrite", 1, 0, False),
]


@pytest.mark.parametrize("gqa, dim, dtype, layout, page, mode, pool_kernel, extra, backend_lse",
                         WINDOW_CASES)
def test_window_scores(gqa: int, dim: int, dtype: torch.dtype, layout: str, page: int,
                       mode: str, pool_kernel: int, extra: int, backend_lse: bool) -> None:
    g = torch.Generator().manual_seed(7 * gqa + dim)
    kv_heads = 2 if gqa < 8 else 1
    lens = ragged_lens(g, 3, page, 60)
    pool = make_pool(gqa + dim, layout, page, kv_heads, dim, dtype, lens)
    # Window sizes: the whole (short) sequence, one query, and a few queries.
    counts = [min(s, c) for s, c in zip(lens, [lens[0], 1, 7], strict=True)]
    starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), kv_heads * gqa, dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(dim)
    # A window split over prefill chunks: this step wrote more tokens than it has window queries.
    fresh = torch.tensor([min(s, c + extra) for s, c in zip(lens, counts, strict=True)],
                         dtype=torch.int32) if extra else None
    if mode == "accumulate":
        seeded_scores(pool, g, counts if fresh is None else fresh.tolist())
    before = pool.scores.clone()
    lse = None
    if backend_lse:
        lse = paged_lse(query, starts, pool.key, pool.block_table, pool.seq_lens, scale,
                        max_queries=max(counts)) / LOG2E
    window_scores(query, starts, pool.key, pool.block_table, pool.seq_lens, scale,
                  pool.score_view, mode, pool_kernel, fresh=fresh, lse=lse, block_n=16, rows=16,
                  split_len=32)
    got, pool.scores = pool.scores, before.clone()
    window_scores_paged_reference(query, starts, pool.key, pool.block_table, pool.seq_lens,
                                  scale, pool.score_view, mode, pool_kernel, fresh)
    assert_scores(pool, got, pool.scores, before)


def test_window_rejects_even_pool_kernel() -> None:
    pool = make_pool(0, "flash", 16, 1, 64, F16, [5])
    query = torch.zeros(5, 1, 64, dtype=F16)
    with pytest.raises(ValueError, match="odd"):
        window_scores(query, torch.tensor([0, 5], dtype=torch.int32), pool.key, pool.block_table,
                      pool.seq_lens, 1.0, pool.score_view, "overwrite", 4)


# ---------------------------------------------------------------- keydiff

KEYDIFF_CASES = [
    # kv_heads, dim, dtype, layout, page
    (2, 64, F16, "flash", 16),
    (1, 128, BF16, "cpu_t", 16),
    (4, 64, F32, "cpu", 32),
    (2, 128, F16, "flash", 32),
    (2, 64, BF16, "cpu", 16),
]


@pytest.mark.parametrize("kv_heads, dim, dtype, layout, page", KEYDIFF_CASES)
def test_keydiff_scores(kv_heads: int, dim: int, dtype: torch.dtype, layout: str,
                        page: int) -> None:
    g = torch.Generator().manual_seed(kv_heads * dim + page)
    pool = make_pool(dim + page, layout, page, kv_heads, dim, dtype, ragged_lens(g, 4, page, 80))
    # An offset shared by all keys, as real keys have: the mean is far from zero.
    pool.key[pool.owned.any(dim=1)] += torch.randn(kv_heads, 1, dim, generator=g).to(dtype)
    before = pool.scores.clone()
    keydiff_scores(pool.key, pool.block_table, pool.seq_lens, pool.score_view, block_n=16,
                   split_len=32)
    got, pool.scores = pool.scores, before.clone()
    keydiff_scores_paged_reference(pool.key, pool.block_table, pool.seq_lens, pool.score_view)
    assert_scores(pool, got, pool.scores, before)


# ---------------------------------------------------------------- compaction

def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN == NaN and -0.0 != 0.0."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def keep_pattern(kind: str, held: int, kept: int, kv_heads: int,
                 g: torch.Generator) -> torch.Tensor:
    if kind == "identity":  # nothing moves: only the tail is zeroed
        rows = [torch.arange(kept)] * kv_heads
    elif kind == "shift1":  # drop the first entry: every source is the next destination
        rows = [torch.arange(1, kept + 1)] * kv_heads
    elif kind == "last":  # keep only the newest entry
        rows = [torch.tensor([held - 1])] * kv_heads
    else:  # a different random subset per head, mostly a kept prefix then scattered holes
        rows = [torch.randperm(held, generator=g)[:kept].sort().values for _ in range(kv_heads)]
    return torch.stack(rows)


def kept_count(kind: str, held: int, g: torch.Generator) -> int:
    if kind == "random":
        return int(torch.randint(1, held + 1, (1,), generator=g))
    return {"identity": held, "shift1": held - 1, "last": 1}[kind]


COMPACT_CASES = [
    # kv_heads, dim, dtype, layout, page, with_scores, block_t, block_d, keep kind
    (2, 64, F16, "flash", 16, True, 8, 32, "random"),
    (1, 128, BF16, "cpu_t", 16, True, 16, 64, "random"),
    (4, 64, F32, "cpu", 32, False, 16, 32, "random"),
    (2, 128, F16, "flash", 16, True, 128, 128, "random"),
    (2, 64, BF16, "flash", 16, True, 16, 64, "shift1"),
    (2, 64, F32, "cpu_t", 16, True, 16, 64, "identity"),
    (2, 64, F16, "cpu", 16, True, 4, 64, "last"),
    (2, 96, BF16, "flash", 16, True, 16, 64, "random"),  # the last dim slice is partial
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kv_heads, dim, dtype, layout, page, with_scores, block_t, block_d, kind",
                         COMPACT_CASES)
def test_compaction(seed: int, kv_heads: int, dim: int, dtype: torch.dtype, layout: str,
                    page: int, with_scores: bool, block_t: int, block_d: int, kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    lens = ragged_lens(g, 3, page, 70)
    pool = make_pool(seed + dim, layout, page, kv_heads, dim, dtype, lens)
    pool.scores[pool.owned] = torch.rand(int(pool.owned.sum()), kv_heads, generator=g)
    kept = [kept_count(kind, s, g) for s in lens]  # ragged; 0 for "shift1" of one token
    # Padding past num_kept points far outside the pool: reading it would fail loudly.
    keep = torch.full((len(lens), kv_heads, max(max(kept), 1)), 1 << 30, dtype=torch.int64)
    for r, (s, k) in enumerate(zip(lens, kept, strict=True)):
        if k:
            keep[r, :, :k] = keep_pattern(kind, s, k, kv_heads, g)
    num_kept = torch.tensor(kept, dtype=torch.int32)
    before_cache, before_scores = pool.cache.clone(), pool.scores.clone()
    compact(pool.key, pool.value, pool.score_view if with_scores else None, pool.block_table,
            keep, num_kept, block_t=block_t, block_d=block_d)
    got_cache, got_scores = pool.cache.clone(), pool.scores.clone()

    pool.cache.copy_(before_cache)
    pool.scores.copy_(before_scores)
    tensors = [pool.key, pool.value] + ([pool.score_view.unsqueeze(-1)] if with_scores else [])
    for r, (s, k) in enumerate(zip(lens, kept, strict=True)):
        if k:
            compact_request_reference(tensors, pool.block_table[r, :cdiv(s, page)].long(),
                                      keep[r, :, :k])
    assert torch.equal(bits(got_cache), bits(pool.cache))
    assert torch.equal(bits(got_scores), bits(pool.scores))
    if kind != "identity":
        assert not torch.equal(bits(got_cache), bits(before_cache)), "nothing moved"
    # Past the kept entries: zero to the end of the last kept page (stale NaN before).
    got_key = views_of(layout, got_cache)[0]
    for r, k in enumerate(kept):
        pg, slot = paged_index(pool.block_table[r], cdiv(k, page) * page, page)
        assert (got_key[pg[k:], :, slot[k:]] == 0).all()
    assert torch.isnan(pool.key[pool.poison_page]).all()


def test_compaction_of_one_request_matches_the_reference_signature() -> None:
    from vllm_evict.kernels.triton_compaction import compact_request

    pool = make_pool(3, "flash", 16, 2, 64, F16, [45])
    keep = torch.tensor([[0, 3, 17, 30, 44], [1, 2, 5, 40, 41]])
    ids = pool.block_table[0, :3].long()
    want = pool.cache.clone()
    wk, wv = gpu_views(want.transpose(1, 2))
    compact_request_reference([wk, wv], ids, keep)
    compact_request(pool.key, pool.value, None, ids, keep, block_t=4)
    assert torch.equal(bits(pool.cache), bits(want))


def test_batched_compaction_of_a_step_matches_the_batched_reference() -> None:
    """The runner's two paths for the requests that compact in one step, over two layers:
    batch_tables + one compact() launch per layer (GPU) and compaction_indices +
    apply_compaction (CPU) give the same caches."""
    from vllm_evict.kernels.compaction import apply_compaction, compaction_indices
    from vllm_evict.kernels.triton_compaction import batch_tables

    g = torch.Generator().manual_seed(11)
    pools = [make_pool(20 + layer, "flash", 16, 2, 64, F16, [45, 70, 33]) for layer in range(2)]
    lens, kept = [45, 70, 33], [20, 37, 33]
    keeps = [torch.stack([torch.stack([torch.randperm(n, generator=g)[:k].sort().values
                                       for _ in range(2)]) for _ in range(2)])
             for n, k in zip(lens, kept, strict=True)]  # [layers, heads, k] per request
    ids = [pools[0].block_table[r, :cdiv(n, 16)].long() for r, n in enumerate(lens)]
    wants = [pool.cache.clone() for pool in pools]
    befores = [pool.cache.clone() for pool in pools]
    indices = compaction_indices(ids, keeps, 16)
    for layer, want in enumerate(wants):
        apply_compaction(list(gpu_views(want.transpose(1, 2))), layer, indices)
    table, keep, counts = batch_tables(ids, keeps)
    for layer, pool in enumerate(pools):
        compact(pool.key, pool.value, None, table, keep[layer], counts, block_t=8)
    for pool, want, before in zip(pools, wants, befores, strict=True):
        assert torch.equal(bits(pool.cache), bits(want))
        assert not torch.equal(bits(want), bits(before))  # entries moved


# ---------------------------------------------------------------- the GPU backend's observer

# One step of a mixed batch: (held length, queries this step, observation or None).
STEP_ROWS: list[tuple[int, int, dict | None]] = [
    (37, 1, {"kind": "ACCUMULATE"}),  # h2o decoding
    (50, 1, {"kind": "LATEST"}),  # tova decoding
    (45, 20, {"kind": "ACCUMULATE"}),  # h2o prefill chunk
    (33, 12, {"kind": "LATEST"}),  # tova prefill chunk
    (60, 30, {"kind": "WINDOW", "window_from": 10, "window_starts": True, "window_ends": True,
              "pool_kernel": 5}),  # snapkv: the whole window in one chunk
    (29, 8, {"kind": "WINDOW", "window_from": 3, "window_starts": True}),  # window starts
    (70, 16, {"kind": "WINDOW"}),  # window goes on
    (41, 9, {"kind": "WINDOW", "window_ends": True, "pool_kernel": 3}),  # window ends
    (48, 1, {"kind": "ACCUMULATE", "hidden": True}),  # pyramidkv: masked, torch path
    (20, 5, None),  # a request without eviction
]


def _observer_case(gqa: int, dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(gqa * dim)
    kv_heads, page = 2, 16
    pool = make_pool(gqa, "flash", page, kv_heads, dim, dtype, [n for n, _, _ in STEP_ROWS])
    counts = [q for _, q, _ in STEP_ROWS]
    query_start = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(counts), kv_heads * gqa, dim, generator=g).to(dtype)
    output = torch.randn(sum(counts), kv_heads * gqa, dim, generator=g).to(dtype)
    observations = []
    for row, (held, _, spec) in enumerate(STEP_ROWS):
        if spec is None:
            continue
        spec = dict(spec)
        kind = stats.Observe[spec.pop("kind")]
        hidden = None
        if spec.pop("hidden", False):
            mask = torch.rand(kv_heads, held, generator=g) < 0.3
            mask[:, -1] = False
            hidden = [mask]
        observations.append(stats.Observation(
            row, kind, visible=None if hidden is None else [~h for h in hidden], **spec))
    seeded_scores(pool, g, counts)
    return pool, query_start, query, output, observations


def _observe(observe_layer, pool, query_start, query, output, observations, block_table=None):
    scores, out = pool.scores.clone(), output.clone()
    plan = stats.StepPlan(observations, [scores], {pool.cache.data_ptr(): 0})
    observe_layer(plan, pool.cache, pool.key, pool.value, query, out, query_start, pool.seq_lens,
                  pool.block_table if block_table is None else block_table, 1 / math.sqrt(
                      query.shape[-1]))
    return scores, out


@pytest.mark.parametrize("gqa, dim, dtype", [(4, 64, F16), (1, 128, BF16), (8, 64, F32)])
def test_gpu_observer_measures_what_the_cpu_statistics_measure(gqa: int, dim: int,
                                                               dtype: torch.dtype) -> None:
    """The GPU backend's observer (batched Triton launches, in vLLM 0.32's GPU cache layout)
    against stats.observe_layer (the CPU backend's torch path) on one mixed step."""
    from vllm_evict.host.attention import gpu

    pool, query_start, query, output, observations = _observer_case(gqa, dim, dtype)
    before = pool.scores.clone()
    want, want_out = _observe(stats.observe_layer, pool, query_start, query, output, observations)
    got, got_out = _observe(gpu.observe_layer, pool, query_start, query, output, observations)
    observed = torch.zeros_like(pool.owned)
    for row in {ob.row for ob in observations}:
        pg, slot = paged_index(pool.block_table[row], int(pool.seq_lens[row]), 16)
        observed[pg, slot] = True
    assert not torch.isnan(got[observed]).any(), "an observed slot was never written"
    torch.testing.assert_close(got[observed], want[observed], **SCALE_TOL)
    assert torch.equal(bits(got[~observed]), bits(before[~observed]))
    assert torch.equal(bits(got_out), bits(want_out))  # the masked request's output, recomputed
    launches = gpu.plan_launches([ob for ob in observations if ob.visible is None],
                                 query_start.tolist(), pool.seq_lens.tolist(), query_start.device)
    assert sorted((la.mode, la.pool_kernel, la.max_queries) for la in launches) == [
        ("accumulate", 1, 20), ("accumulate", 3, 9), ("overwrite", 1, 5), ("overwrite", 5, 20)]


def test_gpu_observer_check_fails_on_a_wrong_block_table() -> None:
    """Negative control for the test above: the same step read through a block table whose rows
    0 and 2 are swapped (both hold > 1 page) must not pass."""
    from vllm_evict.host.attention import gpu

    pool, query_start, query, output, observations = _observer_case(4, 64, F16)
    want, _ = _observe(stats.observe_layer, pool, query_start, query, output, observations)
    wrong = pool.block_table.clone()
    wrong[[0, 2]] = wrong[[2, 0]]
    got, _ = _observe(gpu.observe_layer, pool, query_start, query, output, observations, wrong)
    held = pool.owned
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got[held], want[held], **SCALE_TOL, equal_nan=True)


# ---------------------------------------------------------------- compiled, not interpreted

def test_every_kernel_compiles_for_ampere_and_hopper_without_spills() -> None:
    """What the interpreter cannot see (tl.dot's shape/type rules, control flow, registers):
    compile each kernel to a cubin for sm_80 and sm_90 with the ptxas Triton ships. A separate
    process, since this one's kernels are interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "vllm_evict.kernels.aot_check", "--arch", "80",
                           "90", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"sm80", "sm90"}
    for arch, kernels in report.items():
        assert set(kernels) == {"lse_partial", "lse_partial_window", "lse_merge", "decode_scores",
                                "window_sum", "max_pool", "key_sum", "keydiff", "compact"}, arch
        for name, info in kernels.items():
            assert info.get("local", 0) == 0, f"{arch} {name} spills: {info}"
            # Kernels that stream K/V must use 16-byte loads (a runtime head-size mask once
            # silently made them scalar).
            if name not in ("lse_merge", "max_pool"):
                assert info["vector_loads"] > 0, f"{arch} {name} loads are not vectorised"
