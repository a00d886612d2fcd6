"""A longer load test than tests/test_load.py: many concurrent long requests against one real
`vllm serve`, with mixed policies and budgets, full-cache requests, aborts mid-stream and
client disconnects, in a KV pool small enough to force preemption. The same prompts four times,
at the same pool: vanilla vLLM (VLLM_PLUGINS=""); the plugin with the eviction mix and with
every request on the full cache (one server); and the eviction mix on a server with
`--kv-prefill-eviction` (compaction between prefill chunks, so no evicting request ever holds
more than budget + slack + chunk).

    .venv/bin/python benchmarks/load_test.py [--model DIR] [--requests 48] [--concurrency 12]
    # long prompts only, every request evicting (docs/results/load_test_long_prompts.*):
    .venv/bin/python benchmarks/load_test.py --prompt-range 1000 1400 --output-range 64 128 \
        --full-cache-share 0 --name load_test_long_prompts
    # long prompts and long outputs, every request evicting (load_test_long_outputs.*):
    .venv/bin/python benchmarks/load_test.py --prompt-range 600 1000 --output-range 256 512 \
        --full-cache-share 0 --name load_test_long_outputs

Reports requests, concurrency, preemptions, aborts, p50/p99 latency and pages leaked (pool
usage once idle) per run, and preemptions as a ratio to vanilla's, into
docs/results/load_test.{json,png}.
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


async def run_load(server: VllmServer, model: str, jobs: list[dict], mode: str, concurrency: int):
    """mode: "evict" (each job's policy), "full_cache" (kv_eviction none), "vanilla" (no xargs)."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    latencies, outcomes = [], {"finished": 0, "aborted": 0, "disconnected": 0, "failed": 0}

    async def one(job: dict) -> None:
        xargs = {"kv_eviction": job["policy"], "kv_budget": job["budget"]} if mode == "evict" \
            else {"kv_eviction": "none"}
        body = {"ignore_eos": True, **({"vllm_xargs": xargs} if mode != "vanilla" else {})}
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
    await client.close()
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

    labels = list(result["runs"])
    runs = list(result["runs"].values())
    colors = ["#999999", "#bbbbbb", "#2a7ab0", "#1b4f72"][:len(runs)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (title, key) in zip(axes, [("p50 latency (s)", "p50_s"), ("p99 latency (s)", "p99_s"),
                                        ("preemptions", "preemptions")], strict=True):
        values = [r[key] or 0 for r in runs]
        ax.bar(range(len(labels)), values, color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=9)
    cfg = result["config"]
    leaked = ", ".join(f"{r['pages_leaked']}" for r in runs)
    fig.suptitle(f"{cfg['requests']} requests, concurrency {cfg['concurrency']}, pool "
                 f"{cfg['pages']} pages x 32, prefill chunk {cfg['prefill_chunk']}; pages leaked "
                 f"per run: {leaked}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / f"{cfg['name']}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / ".cache" / "models" / "tiny"))
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[300, 900])
    ap.add_argument("--output-range", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--full-cache-share", type=float, default=0.25)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="load_test",
                    help="docs/results/NAME.{json,png} (e.g. load_test_long_prompts)")
    args = ap.parse_args()
    max_model_len = max(1536, args.prompt_range[1] + args.output_range[1])
    serve = ["--enforce-eager", "--max-model-len", str(max_model_len), "--block-size", "32",
             "--num-gpu-blocks-override", str(args.pages), "--max-num-batched-tokens", "512",
             "--max-num-seqs", str(args.concurrency)]
    plugin = [*serve, "--kv-eviction", "none", "--kv-window", "16", "--kv-slack", "32"]
    jobs = plan(args)
    runs = {}

    def load(label: str, flags: list[str], env: dict, modes: dict[str, str]) -> None:
        server = VllmServer(args.model, flags, ROOT / ".cache" / f"bench-load-{label}.log",
                            env=env)
        server.pages = args.pages
        try:
            for name, mode in modes.items():
                runs[name] = asyncio.run(run_load(server, args.model, jobs, mode,
                                                  args.concurrency))
                print(name, runs[name], flush=True)
        finally:
            server.stop()

    load("vanilla", serve, {"VLLM_PLUGINS": ""}, {"vanilla": "vanilla"})
    load("plugin", plugin, {}, {"plugin, full cache": "full_cache", "eviction": "evict"})
    load("prefill", [*plugin, "--kv-prefill-eviction", "--kv-prefill-chunk",
                     str(args.prefill_chunk)], {}, {"eviction + prefill eviction": "evict"})
    base = runs["vanilla"]
    result = {"config": vars(args), "runs": runs,
              "over_vanilla": {name: {
                  "preemptions": round(r["preemptions"] / base["preemptions"], 3)
                  if base["preemptions"] else None,
                  "p50_s": round(r["p50_s"] / base["p50_s"], 3),
                  "p99_s": round(r["p99_s"] / base["p99_s"], 3)}
                  for name, r in runs.items() if name != "vanilla"}}
    print(write_json(args.name, result))
    plot(result)
    print(result["over_vanilla"])


if __name__ == "__main__":
    main()
