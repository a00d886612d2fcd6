"""Run the GPU kernel benchmark: `python -m benchmarks.kernels_gpu` (see __init__)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.kernels_gpu import (
    HEAD_DIM,
    KV_HEADS,
    PAGE,
    POOL,
    Q_HEADS,
    ROOT,
    TARGETS,
    WINDOW,
    import_kernels,
)
from benchmarks.kernels_gpu import __doc__ as DOC
from benchmarks.kernels_gpu.checks import check_against_references
from benchmarks.kernels_gpu.pools import pool_bytes
from benchmarks.kernels_gpu.report import plot
from benchmarks.kernels_gpu.sweep import CONFIGS, SMOKE_CONFIGS, run_shape
from benchmarks.kernels_gpu.timing import Timer, copy_bandwidth


def main() -> int:
    parser = argparse.ArgumentParser(description=DOC.splitlines()[0])
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
        print("benchmarks.kernels_gpu: no CUDA device here, nothing to measure. Run it on a GPU machine "
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
    skipped: list[dict[str, Any]] = []
    baseline: str | None = None

    def worst(kernel: str, key: str, pick: Callable[..., Any]) -> Any:
        vals = [r[key] for r in results if r["kernel"] == kernel]
        return pick(vals) if vals else None

    def write(complete: bool) -> dict[str, Any]:
        """Write the JSON (and the plot, once complete) with every shape measured so far."""
        summary = {
            "decode_scores_over_decode_step_max": worst("decode_scores", "fraction_of_decode_step", max),
            "decode_scores_backend_lse_over_decode_step_max":
                worst("decode_scores_backend_lse", "fraction_of_decode_step", max),
            "compaction_of_copy_bandwidth_min": worst("compaction", "fraction_of_floor", min),
        }
        report = {
            "device": name, "torch": torch.__version__, "triton": triton.__version__,
            "smoke": args.smoke, "dtype": args.dtype, "complete": complete,
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
        plotted = complete and plot(results, args.out_dir / f"{stem}.png",
                                    f"{name} · {args.dtype} · Llama-3.1-8B shapes · baseline: {baseline}")
        if complete:
            print(f"wrote {args.out_dir / f'{stem}.json'}" + (" and .png" if plotted else ""))
        return summary

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
            write(complete=False)  # a run cut short by a time limit keeps what it measured

    summary = write(complete=True)
    print("summary:", json.dumps(summary))
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
