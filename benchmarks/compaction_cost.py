"""What one compaction costs on this machine: time against prompt length and batch, and the
bytes it moves against the copy bandwidth the machine has.

    .venv/bin/python benchmarks/compaction_cost.py [--lengths 1024 4096 16384] [--batches 1 4]

A synthetic paged pool shaped like SmolLM2-135M's (30 layers, 3 KV heads, head size 64, bf16,
pages of 16), each request holding `length` entries compacted to half of them (a compaction
at the end of a long prompt). Timed: the runner's CPU path for the requests of one step
(kernels/compaction.py: indices built once, then one gather + scatter per layer for K, V and the
float32 scores), and h2o's selection (top-k of the scores). The bandwidth baseline is a plain
`torch` copy of the same bytes (read + write) between two preallocated buffers. Writes
docs/results/compaction_cost.{json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import RESULTS, pyplot, save_figure, write_json

from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.policies import SelectionInput, get_policy_class
from vllm_evict.kernels.compaction import apply_compaction, compaction_indices
from vllm_evict.kernels.paged import cdiv

LAYERS, HEADS, DIM, PAGE = 30, 3, 64, 16


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def measure(length: int, batch: int, repeats: int) -> dict:
    pages = cdiv(length, PAGE)
    blocks = pages * batch + 1
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(blocks, HEADS, PAGE, DIM, generator=g).to(torch.bfloat16),
               torch.randn(blocks, HEADS, PAGE, DIM, generator=g).to(torch.bfloat16),
               torch.rand(blocks, PAGE, HEADS, generator=g)) for _ in range(LAYERS)]
    perm = torch.randperm(blocks - 1, generator=g)
    block_ids = [perm[r * pages:(r + 1) * pages] for r in range(batch)]
    target = length // 2
    cfg = EvictionConfig(policy="h2o", budget=target, slack=0)
    policy = get_policy_class("h2o")()
    positions = torch.arange(length).expand(LAYERS, HEADS, -1).clone()
    scores = torch.rand(LAYERS, HEADS, length, generator=g)
    inp = SelectionInput("bench", positions, length, target, cfg, scores=scores)
    keeps = [policy.select(inp) for _ in range(batch)]

    def compact() -> None:
        indices = compaction_indices(block_ids, keeps, PAGE)
        for layer, (key, value, buf) in enumerate(layers):
            apply_compaction([key, value, buf.permute(0, 2, 1).unsqueeze(-1)], layer, indices)

    # Bytes a compaction reads and writes: every kept entry's K and V (bf16) and score (fp32).
    moved = batch * LAYERS * HEADS * target * (2 * DIM * 2 + 4)
    src = torch.empty(moved, dtype=torch.uint8)
    dst = torch.empty_like(src)
    compact_ms = _median_ms(compact, repeats)
    copy_ms = _median_ms(lambda: dst.copy_(src), repeats)
    select_ms = _median_ms(lambda: policy.select(inp), repeats)
    return {"length": length, "batch": batch, "kept": target, "bytes_moved": moved,
            "compact_ms": round(compact_ms, 3), "select_ms_per_request": round(select_ms, 3),
            "copy_same_bytes_ms": round(copy_ms, 3),
            "compact_gb_per_s": round(2 * moved / compact_ms / 1e6, 2),
            "copy_gb_per_s": round(2 * moved / copy_ms / 1e6, 2),
            "compact_over_copy": round(compact_ms / copy_ms, 2)}


def plot(rows: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for batch in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == batch]
        axes[0].plot([r["length"] for r in rs], [r["compact_ms"] for r in rs], marker="o",
                     label=f"compaction, batch {batch}")
        axes[0].plot([r["length"] for r in rs], [r["copy_same_bytes_ms"] for r in rs],
                     marker=".", linestyle="--", label=f"plain copy, batch {batch}")
        axes[1].plot([r["length"] for r in rs], [r["compact_over_copy"] for r in rs], marker="o",
                     label=f"batch {batch}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("held entries per request (compacted to half)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("ms per compaction step")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("compaction time / copy time")
    fig.suptitle(f"CPU, {LAYERS} layers x {HEADS} KV heads x {DIM}, bf16, pages of {PAGE}",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / "compaction_cost.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            rows.append(measure(length, batch, args.repeats))
            print(rows[-1], flush=True)
    result = {"config": {**vars(args), "layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM,
                         "page_size": PAGE, "threads": torch.get_num_threads()}, "rows": rows}
    print(write_json("compaction_cost", result))
    plot(rows)


if __name__ == "__main__":
    main()
