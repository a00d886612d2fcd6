"""Full-cache retention with 95% confidence intervals, for the quality report.

Retention of a (policy, budget) = its mean RULER score / the full cache's mean score, both over
the same samples (each evicting row is paired with its sample's full-cache row: "none" for the
plugin, "kvpress-none" for kvpress presses). The intervals are percentile intervals of a
bootstrap over samples, stratified by task (every resample keeps each task's sample count), so
they reflect how few prompts a cell holds; they do not cover other models or tasks.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

FULL_CACHE, EXTERNAL_PREFIX = "none", "kvpress-"
RESAMPLES = 2000


def baseline_of(policy: str) -> str:
    return "kvpress-none" if policy.startswith(EXTERNAL_PREFIX) else FULL_CACHE


def _interval(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def retention_rows(rows: list[dict[str, Any]], context_len: int, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """One dict per (policy, budget) at `context_len`: n, score and retention (x 100) with
    their 95% intervals, and the baseline's score on the same samples."""
    rows = [r for r in rows if r["context_len"] == context_len]
    base = {(r["policy"], r["id"]): r["score"] for r in rows if r["budget"] is None}
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r["budget"] is not None and (baseline_of(r["policy"]), r["id"]) in base:
            cells[(r["policy"], r["budget"])].append(r)
    out = []
    rng = random.Random(seed)
    for (policy, budget), cell in sorted(cells.items()):
        pairs = defaultdict(list)  # task -> [(score, full-cache score)]
        for r in cell:
            pairs[r["task"]].append((r["score"], base[(baseline_of(policy), r["id"])]))
        flat = [p for ps in pairs.values() for p in ps]
        scores, ratios = [], []
        for _ in range(RESAMPLES):
            sample = [rng.choice(ps) for ps in pairs.values() for _ in ps]
            got, full = sum(s for s, _ in sample), sum(f for _, f in sample)
            scores.append(100 * got / len(sample))
            ratios.append(100 * got / full if full else float("nan"))
        got, full = sum(s for s, _ in flat), sum(f for _, f in flat)
        out.append({"policy": policy, "budget": budget, "context_len": context_len,
                    "share_of_context": budget / context_len, "n": len(flat),
                    "tasks": len(pairs), "score": 100 * got / len(flat),
                    "score_ci": _interval(scores), "full_cache_score": 100 * full / len(flat),
                    "retention": 100 * got / full if full else float("nan"),
                    "retention_ci": _interval([x for x in ratios if x == x] or [float("nan")])})
    return out


def markdown(rows: list[dict[str, Any]], context_len: int) -> list[str]:
    table = retention_rows(rows, context_len)
    if not table:
        return []
    out = [f"### Full-cache retention at {context_len} tokens, with 95% intervals", "",
           "Retention = score / full-cache score on the same samples (kvpress presses: over "
           "kvpress's own full cache); intervals: stratified bootstrap over samples "
           f"({RESAMPLES} resamples).", "",
           "| policy | budget (share of context) | prompts | score [95% CI] | full cache, same "
           "prompts | retention % [95% CI] |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(table, key=lambda r: (r["budget"], -r["retention"])):
        lo, hi = r["score_ci"]
        rlo, rhi = r["retention_ci"]
        out.append(f"| {r['policy']} | {r['budget']} ({100 * r['share_of_context']:.0f}%) | "
                   f"{r['n']} | {r['score']:.1f} [{lo:.1f}, {hi:.1f}] | "
                   f"{r['full_cache_score']:.1f} | {r['retention']:.0f} [{rlo:.0f}, {rhi:.0f}] |")
    return [*out, ""]


def plot(rows: list[dict[str, Any]], context_len: int, path, title: str) -> None:
    """Retention per policy with its interval, one panel per budget."""
    from benchmarks.common import pyplot, save_figure

    table = retention_rows(rows, context_len)
    budgets = sorted({r["budget"] for r in table})
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(7 * max(1, len(budgets)), 4.4),
                             squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets, strict=False):
        cell = sorted((r for r in table if r["budget"] == budget), key=lambda r: -r["retention"])
        names = [r["policy"] for r in cell]
        values = [r["retention"] for r in cell]
        errors = [[r["retention"] - r["retention_ci"][0] for r in cell],
                  [r["retention_ci"][1] - r["retention"] for r in cell]]
        colors = ["#d08030" if n.startswith(EXTERNAL_PREFIX) else "#2a7ab0" for n in names]
        ax.bar(range(len(cell)), values, yerr=errors, color=colors, capsize=3)
        ax.set_xticks(range(len(cell)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.axhline(100, color="#666666", linestyle="--", linewidth=1)
        ax.set_title(f"budget {budget} ({100 * budget / context_len:.0f}% of {context_len})",
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("% of the full-cache score (95% CI)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
