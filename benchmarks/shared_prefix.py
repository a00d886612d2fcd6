"""A shared system prompt: prefix caching with eviction, against vanilla vLLM.

    .venv/bin/python benchmarks/shared_prefix.py [--prefix-len 2000] [--requests 32]

Every request is one shared system prompt (`--prefix-len` tokens) plus its own question, sent
by `--concurrency` clients in a closed loop. Three real `vllm serve` processes in turn, same
model and flags:
  - vanilla vLLM (VLLM_PLUGINS=""), prefix caching on;
  - the plugin with prefix caching off: what every evicting request got before copy on write
    (it neither read nor published the cache);
  - the plugin with prefix caching on (copy on write at the first compaction), one run per
    policy in `--policies` (tova and streaming read every cached page; snapkv reads up to its
    observation window; h2o reads every prompt query, so it publishes but never reads).
Every run sends the same questions after its own system prompt, so no run hits another's
pages. With `--repeats N` each server runs its workloads N times, in a rotated order on the
plugin's server, and every figure is the median over the repeats (TTFT medians move about 10%
from run to run). Reported: prefix-cache hit rate (vLLM's own counters), TTFT p50/p99 (client
side, streamed), output tokens/s, the plugin's compaction and scoring seconds, and each as a
ratio to vanilla. Writes docs/results/shared_prefix.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

from common import RESULTS, ROOT, SMOLLM2, contain_vllm_files, pyplot, save_figure, write_json

contain_vllm_files()

import openai  # noqa: E402

from tests.helpers.server import VllmServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_workload(server: VllmServer, args, seed: int, xargs: dict | None) -> dict:
    """One run: a system prompt of its own (seed), then the same questions as every run."""
    system = [random.Random(seed).randrange(100, 20000) for _ in range(args.prefix_len)]
    rng = random.Random(0)
    questions = [[rng.randrange(100, 20000) for _ in range(rng.randrange(20, 60))]
                 for _ in range(args.requests)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(question: list[int]) -> None:
        nonlocal tokens
        async with gate:
            started = time.perf_counter()
            stream = await client.completions.create(
                model=args.model, prompt=system + question, max_tokens=args.max_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})})
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first)

    before = server.metrics()
    started = time.perf_counter()
    await asyncio.gather(*(one(q) for q in questions))
    wall = time.perf_counter() - started
    await client.close()  # inside this run's event loop, which asyncio.run then closes
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    queries = delta("vllm:prefix_cache_queries_total")
    return {
        "requests": args.requests, "wall_s": round(wall, 2),
        "hit_rate": round(delta("vllm:prefix_cache_hits_total") / queries, 4) if queries else 0.0,
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(percentile(ttfts, 0.99), 4),
        "output_tok_per_s": round(tokens / wall, 1),
        "compactions": delta("vllm_evict:compactions_total"),
        "compaction_s": round(delta("vllm_evict:compaction_seconds_total"), 3),
        "scoring_s": round(delta("vllm_evict:scoring_seconds_total"), 3),
        "preemptions": delta("vllm:num_preemptions_total"),
    }


def serve(label: str, args, extra: list[str], env: dict) -> VllmServer:
    flags = ["--enforce-eager", "--max-model-len", str(args.prefix_len + 128 + args.max_tokens),
             "--block-size", str(args.page_size), "--max-num-seqs", str(args.concurrency),
             "--max-num-batched-tokens", "2048", *extra]
    return VllmServer(args.model, flags, ROOT / ".cache" / f"bench-shared-prefix-{label}.log",
                      env=env)


def plot(result: dict) -> None:
    plt = pyplot()
    runs = result["runs"]
    names = list(runs)
    panels = [("prefix-cache hit rate", "hit_rate"), ("TTFT p50 (s)", "ttft_p50_s"),
              ("TTFT p99 (s)", "ttft_p99_s"), ("output tokens/s", "output_tok_per_s")]
    colors = ["#999999" if n == "vanilla" else "#d08030" if "caching off" in n else "#2a7ab0"
              for n in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [runs[n][key] for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=10)
    cfg = result["config"]
    fig.suptitle(f"{cfg['requests']} requests sharing a {cfg['prefix_len']}-token system prompt, "
                 f"{cfg['concurrency']} concurrent, {cfg['max_tokens']} output tokens, budget "
                 f"{cfg['budget']} (grey: vanilla vLLM; orange: eviction before copy on write)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / "shared_prefix.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--prefix-len", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--policies", nargs="+", default=["tova", "streaming", "snapkv", "h2o"])
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each workload per server (rotated order; medians reported)")
    args = ap.parse_args()
    repeats: dict[str, list[dict]] = {}
    seeds = iter(range(1, 10_000))  # a fresh system prompt for every run

    def run_all(server: VllmServer, workloads: dict[str, dict | None], times: int) -> None:
        labels = list(workloads)
        for r in range(times):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                out = asyncio.run(run_workload(server, args, next(seeds), workloads[label]))
                repeats.setdefault(label, []).append(out)
                print(label, f"repeat {r + 1}/{times}", out, flush=True)

    with serve("vanilla", args, [], {"VLLM_PLUGINS": ""}) as server:
        run_all(server, {"vanilla": None}, args.repeats)
    plugin = ["--kv-eviction", "tova", "--kv-budget", str(args.budget)]
    with serve("no-caching", args, [*plugin, "--no-enable-prefix-caching"], {}) as server:
        run_all(server, {"tova, caching off": None}, 1)  # 18x vanilla's TTFT: once is enough
    with serve("plugin", args, plugin, {}) as server:
        run_all(server, {"plugin, kv_eviction none": {"kv_eviction": "none"},
                         **{policy: {"kv_eviction": policy, "kv_budget": args.budget}
                            for policy in args.policies}}, args.repeats)
    runs = {label: {key: statistics.median(run[key] for run in outs) for key in outs[0]}
            for label, outs in repeats.items()}
    base = runs["vanilla"]
    ratios = {label: {key: round(r[key] / base[key], 3) if base[key] else None
                      for key in ("hit_rate", "ttft_p50_s", "ttft_p99_s", "output_tok_per_s")}
              for label, r in runs.items() if label != "vanilla"}
    result = {"config": {**vars(args), "cpu_threads": os.cpu_count()}, "runs": runs,
              "over_vanilla": ratios,
              "repeats": {label: [run["ttft_p50_s"] for run in outs]
                          for label, outs in repeats.items()}}
    print(write_json("shared_prefix", result))
    plot(result)
    for label, r in ratios.items():
        print(f"{label:28s} {r}")


if __name__ == "__main__":
    main()
