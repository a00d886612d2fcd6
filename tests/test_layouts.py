"""The CPU cache layout of every ISA vLLM's CPU backend can pick, written by vLLM's own op.

vLLM 0.32 chooses the ISA from the CPU (`_get_attn_isa`: amx for bf16 on CPUs with AMX tiles,
vec with AVX-512, vec16 for head sizes that are multiples of 16 only). The cache-write op of
each x86 ISA is plain packing code, so it runs on any x86 CPU (checked in a subprocess first,
since an illegal instruction would kill pytest): every layout is tested on every machine, and
no test depends on which CPU it ran on.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from vllm_evict.host.attention.layouts import cpu_views, probe_cpu_layout, write_with_cpu_op
from vllm_evict.kernels.compaction import compact_request_reference
from vllm_evict.kernels.paged import MappedPagedView, cdiv, gather_paged

# (isa, dtype, block_size, head_size): what vLLM picks on some CPU, plus amx in fp32/fp16,
# which its op also packs.
CASES = [
    ("vec", torch.float32, 32, 64), ("vec", torch.bfloat16, 32, 64),
    ("vec", torch.float16, 128, 64), ("vec16", torch.bfloat16, 16, 48),
    ("vec16", torch.float32, 16, 80), ("amx", torch.bfloat16, 32, 64),
    ("amx", torch.bfloat16, 128, 128), ("amx", torch.float32, 32, 64),
    ("amx", torch.float16, 64, 96),
]
IDS = [f"{isa}-{str(dt).removeprefix('torch.')}-bs{bs}-d{d}" for isa, dt, bs, d in CASES]

_PROBE = """
import sys, torch
from vllm_evict.host.attention.layouts import write_with_cpu_op
for case in sys.argv[2:]:
    dt, bs, d = case.split(":")
    dt, bs, d = getattr(torch, dt), int(bs), int(d)
    k = torch.ones(1, 1, d, dtype=dt)
    write_with_cpu_op(k, k, torch.zeros(1, 1, bs, 2 * d, dtype=dt),
                      torch.zeros(1, dtype=torch.long), sys.argv[1])
"""


@functools.cache
def _isa_probe(isa: str) -> tuple[int, str]:
    """Run every case of `isa` through the op in one subprocess: (returncode, last stderr line)."""
    cases = [f"{str(dt).removeprefix('torch.')}:{bs}:{d}" for i, dt, bs, d in CASES if i == isa]
    proc = subprocess.run([sys.executable, "-c", _PROBE, isa, *cases], capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def _op_runs(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> None:
    returncode, error = _isa_probe(isa)
    if returncode != 0:
        pytest.skip(f"vLLM's cache-write op for {isa} does not run on this CPU "
                    f"(rc {returncode}): {error}")


def _write_tokens(isa, dtype, bs, dim, heads=2, num_blocks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.zeros(num_blocks, heads, bs, 2 * dim, dtype=dtype)
    pages = torch.tensor([2, 0, 3])  # the request's pages, out of order
    held = 2 * bs + bs // 2  # a partial last page
    slots = pages[torch.arange(held) // bs] * bs + torch.arange(held) % bs
    key = torch.randn(held, heads, dim, generator=g).to(dtype)
    value = torch.randn(held, heads, dim, generator=g).to(dtype)
    write_with_cpu_op(key, value, cache, slots, isa)
    return cache, pages, key, value


@pytest.mark.parametrize("isa, dtype, bs, dim", CASES, ids=IDS)
def test_views_read_what_the_op_wrote(isa, dtype, bs, dim):
    _op_runs(isa, dtype, bs, dim)
    cache, pages, key, value = _write_tokens(isa, dtype, bs, dim)
    k_view, v_view = cpu_views(cache, isa)
    held = key.shape[0]
    assert torch.equal(gather_paged(k_view, pages, held), key.transpose(0, 1))
    assert torch.equal(gather_paged(v_view, pages, held), value.transpose(0, 1))
    assert k_view.data_ptr() == cache.data_ptr()


@pytest.mark.parametrize("isa, dtype, bs, dim", CASES, ids=IDS)
def test_compaction_leaves_the_layout_the_op_would_write(isa, dtype, bs, dim):
    """Compact through the views, then compare byte for byte with the op writing the kept
    entries at their new slots: the attention kernel will read exactly what it expects."""
    _op_runs(isa, dtype, bs, dim)
    cache, pages, key, value = _write_tokens(isa, dtype, bs, dim)
    other_page = cache[1].clone()
    held, heads = key.shape[0], key.shape[1]
    g = torch.Generator().manual_seed(1)
    kept = bs + 3
    keep = torch.stack([torch.randperm(held, generator=g)[:kept].sort().values for _ in range(heads)])
    k_view, v_view = cpu_views(cache, isa)
    compact_request_reference([k_view, v_view], pages, keep)

    want = torch.zeros_like(cache)
    heads_idx = torch.arange(heads)[None, :]
    new_key, new_value = key[keep.T, heads_idx], value[keep.T, heads_idx]  # [kept, heads, dim]
    slots = pages[torch.arange(kept) // bs] * bs + torch.arange(kept) % bs
    write_with_cpu_op(new_key, new_value, want, slots, isa)
    used = pages[: cdiv(kept, bs)]
    assert torch.equal(cache[used], want[used])  # kept entries, and a zeroed stale tail
    assert torch.equal(cache[1], other_page)  # another request's page is untouched


def test_a_view_of_the_wrong_layout_fails():
    """Negative control: the amx-written cache read through vec's views is not the data."""
    _op_runs("amx", torch.bfloat16, 32, 64)
    cache, pages, key, _ = _write_tokens("amx", torch.bfloat16, 32, 64)
    wrong_k, _ = cpu_views(cache, "vec")
    assert not torch.equal(gather_paged(wrong_k, pages, key.shape[0]), key.transpose(0, 1))


def test_strided_layouts_stay_tensor_views_and_amx_is_mapped():
    for isa, dtype, bs, dim, transposed in (("vec", torch.bfloat16, 32, 64, True),
                                            ("vec16", torch.float32, 16, 80, True)):
        _op_runs(isa, dtype, bs, dim)
        assert probe_cpu_layout(dtype, bs, dim, isa).key_transposed is transposed
        k_view, _ = cpu_views(torch.zeros(2, 2, bs, 2 * dim, dtype=dtype), isa)
        assert isinstance(k_view, torch.Tensor)
    _op_runs("amx", torch.bfloat16, 32, 64)
    assert probe_cpu_layout(torch.bfloat16, 32, 64, "amx").key_transposed is None
    k_view, _ = cpu_views(torch.zeros(2, 2, 32, 128, dtype=torch.bfloat16), "amx")
    assert isinstance(k_view, MappedPagedView)
