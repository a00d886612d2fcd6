"""GPU benchmark of the Triton kernels in kernels/ over synthetic paged caches (torch + triton
only; no vLLM).

Shapes are Llama-3.1-8B's (32 query heads, 8 KV heads, head size 128) with pages of 16 tokens,
batches of 1-64 and contexts of 2k-128k, in vLLM 0.32's GPU cache layout (FlashAttention and
Triton attention): logical [blocks, 8, 16, 2 * 128], K then V in the last dim, stored in the
default NHD order [blocks, 16, 8, 256], read through shuffled block tables. For every kernel it reports:
  * the median time over CUDA events (warmup first, L2 flushed before every repetition), both
    replayed from a CUDA graph (as vLLM runs decode) and launched eagerly (compaction, window and
    keydiff scoring run eagerly in vLLM, outside graph capture, so eager is their headline);
  * the fraction of the memory-bandwidth floor: the bytes the job must move (its inputs read
    once, its outputs written once) at the device-to-device copy bandwidth measured here;
  * for decode scoring, its time as a fraction of one decode attention step at the same shapes.
    The step is flash_attn.flash_attn_with_kvcache when flash_attn is installed, otherwise
    torch's scaled_dot_product_attention (enable_gqa) on the same cache, viewed without a copy;
    the JSON names the one used and its SDPA backend.
Before timing, every kernel is checked against its torch reference on a small ragged batch.

Writes docs/results/kernels_gpu.json and docs/results/kernels_gpu.png. Without a CUDA device it
prints why and exits with status 2 (`--smoke` instead runs tiny shapes on the CPU under
TRITON_INTERPRET=1, to check this script itself; its numbers mean nothing).

    pip install --no-deps --no-build-isolation -e .  # once, where the plugin is not installed
    python benchmarks/kernels_gpu.py                 # full grid (several minutes on an H100)
    python benchmarks/kernels_gpu.py --quick         # batches 1 16 64, contexts 2k 32k 128k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
WINDOW, POOL = 64, 5  # snapkv's observation window and pooling kernel (policies/snapkv.py)
TARGETS = {"decode_scores_over_decode_step": 0.10, "compaction_of_copy_bandwidth": 0.70}


def import_kernels() -> dict[str, Any]:
    """`vllm_evict.kernels` is the top-level kernels/ folder, mapped there by the package
    install; on a machine without the plugin installed (the GPU image), install it first:
    `pip install --no-deps --no-build-isolation -e .` (no vLLM needed)."""
    try:
        import vllm_evict.kernels  # noqa: F401
    except ImportError as exc:
        sys.exit(f"{exc}: install the plugin first: pip install --no-deps --no-build-isolation -e .")
    from vllm_evict.kernels import (
        triton_compaction,
        triton_decode_scores,
        triton_keydiff,
        triton_lse,
        triton_window_scores,
    )
    return {"compaction": triton_compaction, "decode": triton_decode_scores,
            "keydiff": triton_keydiff, "lse": triton_lse, "window": triton_window_scores}


# ---------------------------------------------------------------- timing

@dataclass
class Timer:
    device: torch.device
    warmup: int
    reps: int

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        # Bigger than any L2 (50 MB on H100, 60 on H200... 256 MB leaves margin).
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=self.device) if self.cuda else None

    def _median(self, run: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            run()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def eager(self, fn: Callable[[], Any]) -> float:
        return self._median(fn)

    def graph(self, fn: Callable[[], Any]) -> float | None:
        """Median time of replaying fn from a CUDA graph; None if it cannot be captured."""
        if not self.cuda:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and allocate before capture
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as exc:  # report, don't abort the sweep
            print(f"  (graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        return self._median(graph.replay)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    ms = timer.eager(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


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


# ---------------------------------------------------------------- report

def plot(results: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    panels = [("decode_scores", "decode scoring (own LSE pass)"),
              ("decode_scores_backend_lse", "decode scoring (backend LSE)"),
              ("window_scores", f"window scoring (w={WINDOW}, pool {POOL})"),
              ("keydiff_scores", "keydiff scoring"),
              ("compaction", "compaction")]
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (kernel, label) in zip(axes.flat, panels, strict=False):
        for b in batches:
            pts = sorted((r["context"], r["fraction_of_floor"]) for r in results
                         if r["kernel"] == kernel and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"batch {b}")
        if kernel == "compaction":
            ax.axhline(TARGETS["compaction_of_copy_bandwidth"], color="k", ls=":", label="target")
        ax.set(title=label, xscale="log", xlabel="context (tokens)",
               ylabel="fraction of bandwidth floor", ylim=(0, None))
        ax.legend(fontsize=7)
    ax = axes.flat[5]
    for b in batches:
        for kernel, style in (("decode_scores", "-"), ("decode_scores_backend_lse", "--")):
            pts = sorted((r["context"], r["fraction_of_decode_step"]) for r in results
                         if r["kernel"] == kernel and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o",
                        label=f"batch {b}" + (" (backend LSE)" if style == "--" else ""))
    ax.axhline(TARGETS["decode_scores_over_decode_step"], color="k", ls=":", label="target")
    ax.set(title="decode scoring / decode attention step", xscale="log",
           xlabel="context (tokens)", ylabel="time ratio", ylim=(0, None))
    ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--quick", action="store_true", help="batches 1 16 64, contexts 2k 32k 128k")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--keep-fraction", type=float, default=0.5,
                        help="compaction keeps this share of each head's entries")
    parser.add_argument("--max-gib", type=float, default=40.0,
                        help="skip shapes whose pool (K, V, scores, scratch) needs more")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default docs/results (a temporary folder with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; on a machine without CUDA, under the Triton interpreter")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.smoke:
        print("kernels_gpu.py: no CUDA device here, nothing to measure. Run it on a GPU machine "
              "(torch + triton suffice). The kernels' correctness is tested on CPU by "
              "tests/test_kernels_triton.py under TRITON_INTERPRET=1.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated
    k = import_kernels()
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batches, contexts, configs = args.batches, args.contexts, CONFIGS
    if args.quick:
        batches, contexts = [1, 16, 64], [2048, 32768, 131072]
    if args.smoke:
        batches, contexts, configs = [1, 2], [64, 160], SMOKE_CONFIGS
        args.warmup, args.reps = 0, 1
    g = torch.Generator(device=device).manual_seed(0)
    timer = Timer(device, args.warmup, args.reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")

    checks = check_against_references(k, dtype, device, g)
    for check, info in checks.items():
        print(f"check {check:32s} {'ok' if info['ok'] else 'FAILED'} {info.get('max_abs_err', '')}")
    bandwidth = copy_bandwidth(timer, (1 << 30) if device.type == "cuda" else (1 << 20))
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")

    results: list[dict[str, Any]] = []
    skipped, baseline = [], None
    for batch in batches:
        for context in contexts:
            need = pool_bytes(batch, context, dtype, args.keep_fraction)
            if need > args.max_gib * (1 << 30):
                skipped.append({"batch": batch, "context": context, "gib": need / (1 << 30)})
                print(f"skip batch {batch} context {context}: {need / (1 << 30):.1f} GiB")
                continue
            rows, baseline = run_shape(k, timer, batch, context, dtype, bandwidth,
                                       args.keep_fraction, g, configs)
            results += rows
            for r in rows:
                extra = (f" {r['fraction_of_decode_step']:.2f} of a decode step"
                         if "fraction_of_decode_step" in r else "")
                print(f"batch {batch:3d} ctx {context:6d} {r['kernel']:26s} {r['ms']:9.4f} ms "
                      f"({r['timing']}) {r['fraction_of_floor']:5.2f} of floor{extra}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def worst(kernel: str, key: str, pick: Callable[..., Any]) -> Any:
        vals = [r[key] for r in results if r["kernel"] == kernel]
        return pick(vals) if vals else None

    summary = {
        "decode_scores_over_decode_step_max": worst("decode_scores", "fraction_of_decode_step", max),
        "decode_scores_backend_lse_over_decode_step_max":
            worst("decode_scores_backend_lse", "fraction_of_decode_step", max),
        "compaction_of_copy_bandwidth_min": worst("compaction", "fraction_of_floor", min),
    }
    report = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "smoke": args.smoke, "dtype": args.dtype,
        "shapes": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page": PAGE,
                   "layout": "vLLM 0.32 GPU [blocks, kv_heads, page, 2 * head_dim] (stored NHD), shuffled tables",
                   "window": WINDOW, "pool_kernel": POOL, "keep_fraction": args.keep_fraction},
        "copy_bandwidth_bytes_per_s": bandwidth, "decode_step_baseline": baseline,
        "targets": TARGETS, "summary": summary, "checks": checks, "results": results,
        "skipped": skipped,
        "notes": [
            "fraction_of_floor = (bytes the job must move / measured copy bandwidth) / time.",
            "decode scoring reads K twice (LSE pass + weights pass) unless the backend's LSE "
            "is passed; a decode step reads K and V once, so a separate scoring pass costs "
            "about one step (own LSE) or half a step (backend LSE) when memory-bound.",
        ],
    }
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp()) if args.smoke else ROOT / "docs" / "results"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "kernels_gpu_smoke" if args.smoke else "kernels_gpu"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    plotted = plot(results, args.out_dir / f"{stem}.png",
                   f"{name} · {args.dtype} · Llama-3.1-8B shapes · baseline: {baseline}")
    print(f"wrote {args.out_dir / f'{stem}.json'}" + (" and .png" if plotted else ""))
    print("summary:", json.dumps(summary))
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
