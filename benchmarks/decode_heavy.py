"""The reasoning-model case: a decode-heavy workload in a fixed KV pool, vanilla vLLM against
the score policies.

    .venv/bin/python benchmarks/decode_heavy.py [--requests 8] [--max-tokens 1000] [--pages 96]

Short prompts (100 tokens) and long outputs (1,000 tokens) from 8 requests at once, in a pool
of `--pages` pages of 32 tokens (96 x 32 = 3,072 tokens: vanilla can hold about 3 such requests
at their full length). Two real `vllm serve` processes in turn, in float32, with the same pool:
vanilla vLLM (VLLM_PLUGINS="") and the plugin with `--kv-eviction none`, each policy's run
choosing it per request (vllm_xargs) at budget 256. Reported from vLLM's /metrics: output
tokens/s, preemptions, and the peak of running requests (sampled every 250 ms). Vanilla runs
before and after the plugin's server; its baseline is their mean (`--rounds 2` runs the policies
twice, the second time in reverse, for the same reason). Writes
docs/results/decode_heavy.{json,png} (`--name` for another file).
"""

from __future__ import annotations

import argparse
import asyncio
import os

from common import RESULTS, ROOT, SMOLLM2, contain_vllm_files, pyplot, save_figure, write_json

contain_vllm_files()

from pages_and_concurrency import _run  # noqa: E402

from tests.helpers.server import VllmServer  # noqa: E402

POLICIES = ["streaming", "h2o", "tova", "snapkv", "keydiff", "expected_attention"]


def serve(label: str, args, extra: list[str], env: dict) -> VllmServer:
    flags = ["--enforce-eager", "--dtype", "float32", "--max-model-len",
             str(args.prompt_len + args.max_tokens + 64), "--num-gpu-blocks-override",
             str(args.pages), "--block-size", "32", "--max-num-seqs", "32", *extra]
    return VllmServer(args.model, flags, ROOT / ".cache" / f"bench-decode-heavy-{label}.log",
                      env=env)


def mean_of(runs: list[dict]) -> dict:
    """The runs' mean of every number."""
    return {key: round(sum(r[key] for r in runs) / len(runs), 4) for key in runs[0]}


def plot(result: dict) -> None:
    plt = pyplot()
    names = ["vanilla", *result["plugin"]]
    rows = [result["vanilla"], *result["plugin"].values()]
    panels = [("output tokens/s", "output_tok_per_s"), ("preemptions", "preemptions"),
              ("peak running requests", "peak_running")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [r[key] for r in rows]
        ax.bar(names, values, color=["#999999"] + ["#2a7ab0"] * (len(names) - 1))
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    cfg = result["config"]
    fig.suptitle(f"{cfg['requests']} x ({cfg['prompt_len']} prompt + {cfg['max_tokens']} out), "
                 f"pool {cfg['pages']} pages x 32, budget {cfg['budget']}, fp32, CPU", fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / f"{cfg['name']}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--pages", type=int, default=96)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="an extra flag for the plugin's server, e.g. --server-arg=--kv-prefill-eviction "
                         "(its admission then counts each request's bound)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every policy on the plugin's server, every other one in "
                         "reverse order; each policy reports their mean")
    ap.add_argument("--name", default="decode_heavy",
                    help="docs/results/NAME.{json,png} (e.g. decode_heavy_16 for --requests 16)")
    args = ap.parse_args()
    workload = (args.requests, args.prompt_len, args.max_tokens, args.pages)

    def run_vanilla() -> dict:
        server = serve("vanilla", args, [], {"VLLM_PLUGINS": ""})
        try:
            result = asyncio.run(_run(server, args.model, *workload))
        finally:
            server.stop()
        print("vanilla", result, flush=True)
        return result

    vanilla_before = run_vanilla()
    rounds: dict[str, list[dict]] = {policy: [] for policy in args.policies}
    server = serve("plugin", args, ["--kv-eviction", "none", "--kv-slack", "64", *args.server_arg],
                   {})
    try:
        for r in range(args.rounds):
            # Every other round in reverse: on a host whose speed drifts, each policy's mean
            # then sits at the middle of the run, as vanilla's (before and after) does.
            for policy in args.policies if r % 2 == 0 else args.policies[::-1]:
                rounds[policy].append(asyncio.run(_run(
                    server, args.model, *workload,
                    xargs={"kv_eviction": policy, "kv_budget": args.budget})))
                print(policy, rounds[policy][-1], flush=True)
    finally:
        server.stop()
    plugin = {policy: mean_of(runs) for policy, runs in rounds.items()}
    # Vanilla again after the plugin's runs: the host's speed drifts, so its baseline is the
    # mean of the two runs around them, and their gap says how far to trust the ratios.
    vanilla_after = run_vanilla()
    vanilla = mean_of([vanilla_before, vanilla_after])
    base = vanilla["output_tok_per_s"]
    result = {"config": {**vars(args), "cpu_threads": os.cpu_count()}, "vanilla": vanilla,
              "vanilla_before_and_after": [vanilla_before, vanilla_after],
              "plugin": plugin, "plugin_rounds": rounds,
              "tok_per_s_over_vanilla": {p: round(r["output_tok_per_s"] / base, 3)
                                         for p, r in plugin.items()}}
    print(write_json(args.name, result))
    plot(result)
    print(result["tok_per_s_over_vanilla"])


if __name__ == "__main__":
    main()
