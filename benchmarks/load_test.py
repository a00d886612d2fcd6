"""A longer load test than tests/test_load.py: many concurrent long requests against one real
`vllm serve`, with mixed policies and budgets, full-cache requests, aborts mid-stream and
client disconnects, in a KV pool small enough to force preemption. Run twice on the same server
and prompts: once with the eviction mix, once with every request on the full cache.

    .venv/bin/python benchmarks/load_test.py [--model DIR] [--requests 48] [--concurrency 12]

Reports requests, concurrency, preemptions, aborts, p50/p99 latency with and without eviction
and pages leaked (pool usage once idle), into docs/results/load_test.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from common import RESULTS, ROOT, contain_vllm_files, pyplot, save_figure, write_json

contain_vllm_files()

import httpx  # noqa: E402
import openai  # noqa: E402

from tests.helpers.server import VllmServer  # noqa: E402

POLICIES = ["streaming", "h2o", "tova", "snapkv", "pyramidkv", "keydiff", "knorm", "random"]


def plan(args) -> list[dict]:
    """The same requests for both runs: prompt, output length, and what the client does."""
    rng = random.Random(args.seed)
    jobs = []
    for _ in range(args.requests):
        roll = rng.random()
        jobs.append({
            "prompt": [rng.randrange(10, 4000) for _ in range(rng.randrange(*args.prompt_range))],
            "max_tokens": rng.randrange(*args.output_range),
            "policy": "none" if rng.random() < args.full_cache_share else rng.choice(POLICIES),
            "budget": rng.choice([64, 128, 256]),
            "client": "abort" if roll < 0.1 else "disconnect" if roll < 0.15 else "finish",
        })
    return jobs


async def run_load(server: VllmServer, model: str, jobs: list[dict], evict: bool, concurrency: int):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    latencies, outcomes = [], {"finished": 0, "aborted": 0, "disconnected": 0, "failed": 0}

    async def one(job: dict) -> None:
        xargs = {"kv_eviction": job["policy"], "kv_budget": job["budget"]} if evict else \
            {"kv_eviction": "none"}
        body = {"ignore_eos": True, "vllm_xargs": xargs}
        async with gate:
            started = time.perf_counter()
            try:
                if job["client"] == "finish":
                    await client.completions.create(model=model, prompt=job["prompt"],
                                                    max_tokens=job["max_tokens"], temperature=0.0,
                                                    extra_body=body)
                    latencies.append(time.perf_counter() - started)
                    outcomes["finished"] += 1
                elif job["client"] == "abort":
                    stream = await client.completions.create(
                        model=model, prompt=job["prompt"], max_tokens=job["max_tokens"],
                        temperature=0.0, stream=True, extra_body=body)
                    async for _ in stream:
                        break
                    await stream.close()
                    outcomes["aborted"] += 1
                else:
                    async with httpx.AsyncClient(timeout=120) as http, http.stream(
                            "POST", f"{server.url}/v1/completions",
                            json={"model": model, "prompt": job["prompt"], "stream": True,
                                  "max_tokens": job["max_tokens"], **body}) as response:
                        async for _ in response.aiter_lines():
                            break
                    outcomes["disconnected"] += 1
            except Exception:  # counted, never fatal: the report says how many
                outcomes["failed"] += 1

    before = server.metrics()
    started = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    wall = time.perf_counter() - started
    await asyncio.sleep(3.0)  # let aborted requests drain
    after = server.metrics()
    latencies.sort()
    return {
        **outcomes, "wall_s": round(wall, 1),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
        if latencies else None,
        "preemptions": after.get("vllm:num_preemptions_total", 0)
        - before.get("vllm:num_preemptions_total", 0),
        "pages_leaked": round(after.get("vllm:kv_cache_usage_perc", 0) * server.pages),
        "healthy": httpx.get(f"{server.url}/health").status_code == 200,
        "tokens_evicted": after.get("vllm_evict:tokens_evicted_total", 0)
        - before.get("vllm_evict:tokens_evicted_total", 0),
    }


def plot(result: dict) -> None:
    plt = pyplot()

    labels = ["without eviction", "with eviction"]
    runs = [result["full_cache"], result["evict"]]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (title, key) in zip(axes, [("p50 latency (s)", "p50_s"), ("p99 latency (s)", "p99_s"),
                                        ("preemptions", "preemptions")], strict=True):
        values = [r[key] or 0 for r in runs]
        ax.bar(labels, values, color=["#999999", "#2a7ab0"])
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=9)
    cfg = result["config"]
    fig.suptitle(f"{cfg['requests']} requests, concurrency {cfg['concurrency']}, pool "
                 f"{cfg['pages']} pages; pages leaked: {result['evict']['pages_leaked']} / "
                 f"{result['full_cache']['pages_leaked']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / "load_test.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / ".cache" / "models" / "tiny"))
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[300, 900])
    ap.add_argument("--output-range", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--full-cache-share", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    serve = ["--enforce-eager", "--max-model-len", "1536", "--block-size", "32",
             "--num-gpu-blocks-override", str(args.pages), "--max-num-batched-tokens", "512",
             "--max-num-seqs", str(args.concurrency), "--kv-eviction", "none", "--kv-window", "16",
             "--kv-slack", "32"]
    server = VllmServer(args.model, serve, ROOT / ".cache" / "bench-load.log")
    server.pages = args.pages
    try:
        jobs = plan(args)
        evict = asyncio.run(run_load(server, args.model, jobs, True, args.concurrency))
        full = asyncio.run(run_load(server, args.model, jobs, False, args.concurrency))
    finally:
        server.stop()
    result = {"config": vars(args), "evict": evict, "full_cache": full,
              "p50_ratio_evict_over_full": round(evict["p50_s"] / full["p50_s"], 3),
              "p99_ratio_evict_over_full": round(evict["p99_s"] / full["p99_s"], 3)}
    print(write_json("load_test", result))
    plot(result)
    print(result)


if __name__ == "__main__":
    main()
