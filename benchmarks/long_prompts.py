"""Prompts larger than the whole KV pool: the largest prompt each configuration serves in a
fixed pool, and the pages a request holds step by step.

    .venv/bin/python benchmarks/long_prompts.py [--pages 32] [--page-size 32] [--policy tova]

One fixed pool (`--num-gpu-blocks-override`), three configurations of real `vllm serve`:
  - vanilla vLLM (VLLM_PLUGINS="");
  - the plugin, default mode (compaction after the prompt);
  - the plugin with `--kv-prefill-eviction --kv-request-override deny`.
Each is first started with `--max-model-len` = the model's context; vanilla vLLM and the
default mode refuse (one max_model_len must fit in the pool), and are then started with the
largest that fits (the pool less vLLM's null page). Every started server gets prompts of that
size and of 2x, 4x and 8x the pool (up to the model's context; whatever its max_model_len
admits), each plus `--max-tokens` output tokens. Pages held come from the scheduler's own block lists
(VLLM_EVICT_PAGE_TRACE_DIR, every step), not from sampling /metrics; vanilla vLLM has no
plugin, so its pages are its length in pages. Writes docs/results/long_prompts.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time

from common import RESULTS, ROOT, SMOLLM2, contain_vllm_files, pyplot, save_figure, write_json

contain_vllm_files()

import openai  # noqa: E402

from tests.helpers.server import VllmServer  # noqa: E402
from vllm_evict.core.dump import read_page_trace  # noqa: E402


def start(label: str, args, max_model_len: int, extra: list[str], env: dict
          ) -> tuple[VllmServer | None, str | None]:
    """(server, None), or (None, the reason it refused to start)."""
    flags = ["--enforce-eager", "--max-model-len", str(max_model_len), "--block-size",
             str(args.page_size), "--num-gpu-blocks-override", str(args.pages),
             "--max-num-batched-tokens", "512", *extra]
    log = ROOT / ".cache" / f"bench-long-{label}-{max_model_len}.log"
    try:
        return VllmServer(args.model, flags, log, env=env), None
    except RuntimeError as exc:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
                 if line.startswith(("ValueError", "AssertionError"))]
        return None, (lines[-1] if lines else str(exc).splitlines()[0])[:400]


def usable_tokens(args) -> int:
    """What one request can hold in the pool: vLLM keeps one page back (the null block)."""
    return (args.pages - 1) * args.page_size


def serve_prompts(server: VllmServer, args, xargs: dict | None) -> list[dict]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=600)
    pool = args.pages * args.page_size
    fits = usable_tokens(args)
    rows = []
    for multiple in (1, 2, 4, 8):
        whole = fits if multiple == 1 else min(multiple * pool, args.model_len)
        prompt_len = whole - args.max_tokens  # past max_model_len: the server's own 400
        rng = random.Random(multiple)
        prompt = [rng.randrange(100, 20000) for _ in range(prompt_len)]
        started = time.perf_counter()
        try:
            res = client.completions.create(
                model=args.model, prompt=prompt, max_tokens=args.max_tokens, temperature=0.0,
                extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})})
            rows.append({"prompt_len": prompt_len, "served": True,
                         "completion_tokens": res.usage.completion_tokens,
                         "seconds": round(time.perf_counter() - started, 2)})
        except openai.APIStatusError as exc:
            rows.append({"prompt_len": prompt_len, "served": False,
                         "error": f"{exc.status_code}: {exc.message[:200]}"})
        print(rows[-1], flush=True)
    return rows


def page_curves(trace_dir: str) -> list[dict]:
    """Per request, in arrival order: (logical length, pages held) at every step it ran."""
    by_request: dict[str, dict] = {}
    for r in read_page_trace(trace_dir):
        curve = by_request.setdefault(r["request_id"], {"logical_len": [], "pages": []})
        curve["logical_len"].append(r["logical_len"])
        curve["pages"].append(r["pages"])
    return [{"peak_pages": max(c["pages"]), "final_logical_len": c["logical_len"][-1], **c}
            for c in by_request.values()]


def run_config(label: str, args, extra: list[str], env: dict, xargs: dict | None) -> dict:
    pool = args.pages * args.page_size
    trace_dir = ROOT / ".cache" / f"page-trace-{label}"
    shutil.rmtree(trace_dir, ignore_errors=True)
    env = {**env, "VLLM_EVICT_PAGE_TRACE_DIR": str(trace_dir)}
    out: dict = {"flags": extra}
    server, refused = start(label, args, args.model_len, extra, env)
    max_model_len = args.model_len
    if server is None:
        out["refused_at_model_len"] = {"max_model_len": args.model_len, "reason": refused}
        print(label, "refused:", refused, flush=True)
        max_model_len = usable_tokens(args)
        server, refused = start(label, args, max_model_len, extra, env)
        if server is None:
            raise RuntimeError(f"{label} does not start even at max_model_len={max_model_len}: "
                               f"{refused}")
    out["max_model_len"] = max_model_len
    with server:
        out["prompts"] = serve_prompts(server, args, xargs)
    served = [r["prompt_len"] for r in out["prompts"] if r["served"]]
    out["largest_prompt_served"] = max(served, default=0)
    out["largest_over_pool"] = round(out["largest_prompt_served"] / pool, 2)
    if trace_dir.exists():
        curves = page_curves(str(trace_dir))
        for row, curve in zip([r for r in out["prompts"] if r["served"]], curves, strict=False):
            row["peak_pages"] = curve["peak_pages"]
        out["page_curves"] = curves
    else:  # vanilla vLLM: no plugin, no trace; a request holds its length in pages
        for row in out["prompts"]:
            if row["served"]:
                row["peak_pages"] = -(-(row["prompt_len"] + args.max_tokens) // args.page_size)
    return out


def plot(result: dict) -> None:
    plt = pyplot()
    cfg, runs = result["config"], result["runs"]
    pool = cfg["pages"] * cfg["page_size"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2),
                                      gridspec_kw={"width_ratios": [1, 2]})
    names = list(runs)
    values = [runs[n]["largest_prompt_served"] for n in names]
    left.bar(range(len(names)), values, color=["#999999", "#d08030", "#2a7ab0"][:len(names)])
    left.axhline(pool, color="black", lw=0.8, ls="--", label=f"whole pool ({pool} tokens)")
    left.set_xticks(range(len(names)), names, fontsize=8)
    for i, v in enumerate(values):
        left.text(i, v, f"{v}", ha="center", va="bottom", fontsize=8)
    left.set_title("largest prompt served (tokens)", fontsize=10)
    left.legend(fontsize=8)
    styles = {"default mode": ("#d08030", "--"), "prefill eviction": ("#2a7ab0", "-")}
    for name, (color, ls) in styles.items():
        for curve in runs.get(name, {}).get("page_curves", []):
            right.plot(curve["logical_len"], curve["pages"], color=color, ls=ls, lw=1.2,
                       label=name if curve is runs[name]["page_curves"][0] else None)
    right.axhline(cfg["pages"], color="black", lw=0.8, ls=":", label="whole pool")
    right.axhline(result["peak_bound_pages"], color="#2a7ab0", lw=0.8, ls=":",
                  label="budget + slack + chunk (+1 page)")
    right.set_xlabel("logical length of the request (tokens)")
    right.set_ylabel("pages held (scheduler, every step)")
    right.set_title(f"pages per request, {cfg['policy']} budget {cfg['budget']}, chunk "
                    f"{cfg['chunk']}", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"fixed pool of {cfg['pages']} pages x {cfg['page_size']} tokens, "
                 f"{cfg['max_tokens']} output tokens per request", fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / "long_prompts.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--slack", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        args.model_len = json.load(f)["max_position_embeddings"]
    evict = ["--kv-eviction", args.policy, "--kv-budget", str(args.budget), "--kv-slack",
             str(args.slack)]
    runs = {
        "vanilla": run_config("vanilla", args, [], {"VLLM_PLUGINS": ""}, None),
        "default mode": run_config("default", args, evict, {}, None),
        "prefill eviction": run_config(
            "prefill", args, [*evict, "--kv-prefill-eviction", "--kv-prefill-chunk",
                              str(args.chunk), "--kv-request-override", "deny"], {}, None),
    }
    bound = -(-(args.budget + args.slack + args.chunk) // args.page_size) + 1
    pool = args.pages * args.page_size
    result = {"config": {**vars(args), "cpu_threads": os.cpu_count()}, "runs": runs,
              "peak_bound_pages": bound,
              "largest_over_vanilla": {n: round(r["largest_prompt_served"]
                                                / runs["vanilla"]["largest_prompt_served"], 2)
                                       for n, r in runs.items()},
              "pool_tokens": pool}
    print(write_json("long_prompts", result))
    plot(result)
    for name, r in runs.items():
        print(f"{name:18s} largest {r['largest_prompt_served']} ({r['largest_over_pool']}x pool) "
              f"peaks {[p.get('peak_pages') for p in r['prompts']]}")


if __name__ == "__main__":
    main()
