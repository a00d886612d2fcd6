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
    python -m benchmarks.kernels_gpu                 # full grid (several minutes on an H100)
    python -m benchmarks.kernels_gpu --quick         # batches 1 16 64, contexts 2k 32k 128k
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
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
