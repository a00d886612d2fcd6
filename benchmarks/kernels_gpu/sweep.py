"""The sweep: every kernel over the batch x context grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.kernels_gpu import HEAD_DIM, KV_HEADS, POOL, Q_HEADS, WINDOW
from benchmarks.kernels_gpu.pools import decode_step, keep_indices, make_pool
from benchmarks.kernels_gpu.timing import Timer

# ---------------------------------------------------------------- the sweep

def measure(timer: Timer, name: str, fn: Callable[[], Any], floor_bytes: int, bandwidth: float,
            headline: str, **extra: Any) -> dict[str, Any]:
    graph_ms = timer.graph(fn) if headline == "graph" else None
    eager_ms = timer.eager(fn)
    ms = graph_ms if graph_ms is not None else eager_ms
    floor_ms = floor_bytes / bandwidth * 1e3
    return {"kernel": name, "ms": ms, "ms_graph": graph_ms, "ms_eager": eager_ms,
            "timing": "graph" if graph_ms is not None else "eager", "floor_bytes": floor_bytes,
            "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms, **extra}


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    top = min(rows, key=lambda r: r["ms"])
    return {**top, "configs": [{"config": r["config"], "ms": r["ms"]} for r in rows]}


def run_shape(k: dict[str, Any], timer: Timer, batch: int, context: int, dtype: torch.dtype,
              bandwidth: float, keep_fraction: float, g: torch.Generator,
              configs: dict[str, list[dict[str, int]]]) -> tuple[list[dict[str, Any]], str]:
    device = timer.device
    pool = make_pool(batch, context, dtype, device, g)
    scale = HEAD_DIM ** -0.5
    query = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device, generator=g).to(dtype)
    elt = dtype.itemsize
    k_bytes = batch * context * KV_HEADS * HEAD_DIM * elt
    score_bytes = batch * context * KV_HEADS * 4
    shape = {"batch": batch, "context": context}
    rows: list[dict[str, Any]] = []

    step, baseline, lse = decode_step(pool, query, scale)
    if lse is None:  # what the backend would hand over; our own pass produces the same numbers
        starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
        lse = k["lse"].paged_lse(query, starts, pool.key, pool.table, pool.seq_lens, scale,
                                 max_queries=1, max_seq_len=context) / k["lse"].LOG2E
    step_row = measure(timer, "decode_step", step, 2 * k_bytes, bandwidth, "graph",
                       config={"baseline": baseline}, **shape)
    rows.append(step_row)

    for name, backend_lse in (("decode_scores", None), ("decode_scores_backend_lse", lse)):
        variants = []
        for cfg in configs["decode"]:
            def fn(cfg: dict[str, int] = cfg, backend_lse: torch.Tensor | None = backend_lse) -> None:
                k["decode"].decode_scores(query, pool.key, pool.table, pool.seq_lens, scale,
                                          pool.score_view, "accumulate", lse=backend_lse,
                                          max_seq_len=context, **cfg)
            variants.append(measure(timer, name, fn, k_bytes + 2 * score_bytes, bandwidth,
                                    "graph", config=cfg, **shape))
        row = best(variants)
        row["fraction_of_decode_step"] = row["ms"] / step_row["ms"]
        rows.append(row)

    wquery = torch.randn(batch * WINDOW, Q_HEADS, HEAD_DIM, device=device, generator=g).to(dtype)
    starts = torch.arange(0, batch * WINDOW + 1, WINDOW, dtype=torch.int32, device=device)
    flops = 2 * 2 * batch * Q_HEADS * WINDOW * context * HEAD_DIM  # QK^T in both passes
    variants = []
    for cfg in configs["window"]:
        def wfn(cfg: dict[str, int] = cfg) -> None:
            k["window"].window_scores(wquery, starts, pool.key, pool.table, pool.seq_lens, scale,
                                      pool.score_view, "overwrite", POOL, max_queries=WINDOW,
                                      max_seq_len=context, **cfg)
        r = measure(timer, "window_scores", wfn, k_bytes + score_bytes, bandwidth, "eager",
                    config=cfg, **shape)
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        variants.append(r)
    rows.append(best(variants))

    variants = []
    for cfg in configs["keydiff"]:
        def kfn(cfg: dict[str, int] = cfg) -> None:
            k["keydiff"].keydiff_scores(pool.key, pool.table, pool.seq_lens, pool.score_view,
                                        max_seq_len=context, **cfg)
        variants.append(measure(timer, "keydiff_scores", kfn, k_bytes + score_bytes, bandwidth,
                                "eager", config=cfg, **shape))
    rows.append(best(variants))

    keep = keep_indices(pool, keep_fraction, g)
    kept = torch.full((batch,), keep.shape[-1], dtype=torch.int32, device=device)
    moved = int((keep != torch.arange(keep.shape[-1], device=device)).sum())
    # Moved entries: K and V read and written, their scores too. The stale-tail zeroing (under a
    # page per head) is left out of the floor.
    moved_bytes = moved * (2 * HEAD_DIM * elt + 4) * 2
    variants = []
    for cfg in configs["compaction"]:
        def cfn(cfg: dict[str, int] = cfg) -> None:
            k["compaction"].compact(pool.key, pool.value, pool.score_view, pool.table, keep, kept,
                                    **cfg)
        variants.append(measure(timer, "compaction", cfn, moved_bytes, bandwidth, "eager",
                                config=cfg, moved_entries=moved, **shape))
    rows.append(best(variants))
    return rows, baseline


CONFIGS = {
    "decode": [{"block_n": 64, "split_len": 2048, "num_warps": 4},
               {"block_n": 128, "split_len": 4096, "num_warps": 4},
               {"block_n": 64, "split_len": 1024, "num_warps": 8}],
    "window": [{"block_n": 64, "rows": 64, "num_warps": 4},
               {"block_n": 128, "rows": 64, "num_warps": 8}],
    "keydiff": [{"block_n": 64, "split_len": 4096, "num_warps": 4},
                {"block_n": 128, "split_len": 8192, "num_warps": 8}],
    "compaction": [{"block_t": 128, "block_d": 32, "num_warps": 4},
                   {"block_t": 256, "block_d": 32, "num_warps": 8},
                   {"block_t": 128, "block_d": 64, "num_warps": 4},
                   {"block_t": 64, "block_d": 128, "num_warps": 4}],
}
SMOKE_CONFIGS = {name: cfgs[:1] for name, cfgs in CONFIGS.items()}
