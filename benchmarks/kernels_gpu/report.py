"""The plot of the sweep."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.kernels_gpu import POOL, TARGETS, WINDOW

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
