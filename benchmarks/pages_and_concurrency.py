"""Pages per request and concurrency under a fixed KV pool: vanilla vLLM vs vllm-evict.

    .venv/bin/python benchmarks/pages_and_concurrency.py [--model DIR] [--pages 64]

Starts two real `vllm serve` processes in turn with the same fixed pool
(`--num-gpu-blocks-override`): vanilla vLLM (every plugin disabled, VLLM_PLUGINS="") and vLLM
with `--kv-eviction streaming`. Against each it measures, from vLLM's own /metrics:
  1. one long request alone: peak KV pages it holds;
  2. N long requests at once: peak running requests, preemptions, wall time, output tokens/s.
Writes docs/results/pages_and_concurrency.{json,png}.
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


async def _run(server: VllmServer, model: str, n: int, prompt_len: int, max_tokens: int,
               pages: int, xargs: dict | None = None) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    before = server.metrics()
    peak = {"running": 0.0, "usage": 0.0}
    usage: list[float] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            m = await asyncio.to_thread(server.metrics)
            peak["running"] = max(peak["running"], m.get("vllm:num_requests_running", 0))
            peak["usage"] = max(peak["usage"], m.get("vllm:kv_cache_usage_perc", 0))
            usage.append(m.get("vllm:kv_cache_usage_perc", 0))
            # Every 50 ms, fetching and parsing /metrics took ~45% of a core on a 2-core host,
            # beside the API server and the engine core; requests here run for seconds.
            await asyncio.sleep(0.25)

    async def one(seed: int) -> int:
        rng = random.Random(seed)
        res = await client.completions.create(
            model=model, prompt=[rng.randrange(100, 20000) for _ in range(prompt_len)],
            max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})})
        return res.usage.completion_tokens

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(1000 + i) for i in range(n)))
    wall = time.perf_counter() - started
    done.set()
    await sampler
    after = server.metrics()
    return {
        "requests": n, "wall_s": round(wall, 2), "output_tokens": sum(tokens),
        "output_tok_per_s": round(sum(tokens) / wall, 1),
        "peak_running": peak["running"], "peak_kv_usage": round(peak["usage"], 4),
        "peak_pages": round(peak["usage"] * pages, 1),
        # Pages held while decoding: the median over the last half of the run (the peak is
        # the prompt's prefill, which eviction does not shorten).
        "decode_pages": round(statistics.median(usage[len(usage) // 2:] or [0]) * pages, 1),
        "preemptions": after.get("vllm:num_preemptions_total", 0)
        - before.get("vllm:num_preemptions_total", 0),
    }


def measure(label: str, model: str, extra_args: list[str], env: dict, args) -> dict:
    serve = ["--enforce-eager", "--max-model-len", str(args.prompt_len + args.max_tokens + 64),
             "--num-gpu-blocks-override", str(args.pages), "--block-size", str(args.page_size),
             "--max-num-seqs", "32", *extra_args]
    server = VllmServer(model, serve, ROOT / ".cache" / f"bench-{label}.log", env=env)
    try:
        alone = asyncio.run(_run(server, model, 1, args.prompt_len, args.max_tokens, args.pages))
        crowd = asyncio.run(_run(server, model, args.requests, args.prompt_len, args.max_tokens,
                                 args.pages))
        return {"start_s": round(server.start_seconds, 1), "alone": alone, "concurrent": crowd}
    finally:
        server.stop()


def plot(result: dict) -> None:
    plt = pyplot()

    labels = ["vanilla", "evict"]
    panels = [("peak pages, one request", lambda r: r["alone"]["peak_pages"]),
              ("pages while decoding, one request", lambda r: r["alone"]["decode_pages"]),
              ("peak running requests", lambda r: r["concurrent"]["peak_running"]),
              ("preemptions", lambda r: r["concurrent"]["preemptions"]),
              ("output tokens/s", lambda r: r["concurrent"]["output_tok_per_s"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, get) in zip(axes, panels, strict=True):
        values = [get(result[k]) for k in labels]
        ax.bar(labels, values, color=["#999999", "#2a7ab0"])
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=9)
    cfg = result["config"]
    fig.suptitle(f"{cfg['requests']} x ({cfg['prompt_len']} prompt + {cfg['max_tokens']} out), "
                 f"pool {cfg['pages']} pages x {cfg['page_size']}; streaming budget {cfg['budget']}",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / "pages_and_concurrency.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=256)
    args = ap.parse_args()
    vanilla = measure("vanilla", args.model, [], {"VLLM_PLUGINS": ""}, args)
    evict = measure("evict", args.model, ["--kv-eviction", "streaming", "--kv-budget",
                                          str(args.budget), "--kv-slack", "64"], {}, args)
    result = {"config": {**vars(args), "cpu_threads": os.cpu_count()},
              "vanilla": vanilla, "evict": evict,
              "ratios_evict_over_vanilla": {
                  "peak_pages_one_request": round(evict["alone"]["peak_pages"]
                                                  / max(vanilla["alone"]["peak_pages"], 1e-9), 3),
                  "decode_pages_one_request": round(evict["alone"]["decode_pages"]
                                                    / max(vanilla["alone"]["decode_pages"], 1e-9), 3),
                  "peak_running": round(evict["concurrent"]["peak_running"]
                                        / max(vanilla["concurrent"]["peak_running"], 1e-9), 3),
                  "output_tok_per_s": round(evict["concurrent"]["output_tok_per_s"]
                                            / vanilla["concurrent"]["output_tok_per_s"], 3)}}
    print(write_json("pages_and_concurrency", result))
    plot(result)
    print(result)


if __name__ == "__main__":
    main()
