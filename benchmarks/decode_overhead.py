"""Per-step decode time on CPU: vanilla vLLM vs the plugin with each policy, same machine, same run.

    .venv/bin/python benchmarks/decode_overhead.py [--model DIR] [--configs 4x1024 16x1024 4x4096]

For each configuration BATCHxPROMPT, two offline engines in turn (each in its own process):
vanilla vLLM (VLLM_PLUGINS="") and vLLM with the plugin (server default "none", each batch
choosing its policy via extra_args). For each policy a batch of requests is decoded for
`steps` tokens and every engine step after the prefill is timed, in `repeats` rounds over all
policies in rotated orders, each round followed by a drift probe (the first policy again);
the median step is reported
(robust to the other work on a shared machine). The steps include the compactions (every
slack + 1 = 65 tokens). Ratios are over the same configuration's vanilla and streaming steps.
Writes docs/results/decode_overhead.{json,png} (`--name` for another file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from common import RESULTS, SMOLLM2, contain_vllm_files, pyplot, save_figure, write_json

contain_vllm_files()

POLICIES = ["none", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "keydiff", "knorm",
            "expected_attention"]


def worker(args) -> None:
    from vllm import LLM, SamplingParams

    engine = {"model": args.model, "enforce_eager": True, "seed": 0,
              "max_model_len": args.prompt_len + args.steps + 64}
    if args.policies != ["vanilla"]:
        engine["additional_config"] = {"kv_eviction": {"policy": "none", "budget": args.budget,
                                                       "slack": 64}}
    llm = LLM(**engine)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 20000) for _ in range(args.prompt_len)]}
               for _ in range(args.batch)]

    engine = llm.llm_engine

    def decode_steps_ms(policy: str) -> list[float]:
        """Wall time of every engine step once all requests have their first token."""
        extra = None if policy == "vanilla" else {"kv_eviction": policy}
        params = SamplingParams(max_tokens=1 + args.steps, temperature=0.0, ignore_eos=True,
                                extra_args=extra)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{policy}-{i}-{time.monotonic_ns()}", prompt, params)
        times, decoding = [], False
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            outputs = engine.step()
            if decoding:
                times.append(1000 * (time.perf_counter() - started))
            decoding = decoding or all(len(o.outputs[0].token_ids) >= 1 for o in outputs)
        return times

    decode_steps_ms(args.policies[0])  # warm up
    # Rounds in rotated order, so that no policy always runs late in the engine's life (a
    # policy's place in one engine's run moved its median by up to 30%); the first policy runs
    # again at the end of every round to show any drift within the engine.
    steps: dict[str, list[float]] = {p: [] for p in args.policies}
    drift = []
    n = len(args.policies)
    for r in range(args.repeats):
        shift = (r * n) // args.repeats
        order = args.policies[shift:] + args.policies[:shift]
        for policy in order:
            steps[policy] += decode_steps_ms(policy)
        drift.append(round(statistics.median(decode_steps_ms(args.policies[0])), 3))
        print("round", r, "order", order, "drift probe", drift[-1], flush=True)
    out = {}
    for policy, times in steps.items():
        out[policy] = {"step_ms": round(statistics.median(times), 3),
                       "p90_step_ms": round(sorted(times)[int(0.9 * len(times))], 3),
                       "steps_timed": len(times)}
        print(policy, out[policy], flush=True)
    result = {"policies": out,
              "drift_probe_ms": {"policy": args.policies[0], "after_each_round": drift}}
    print("RESULT " + json.dumps(result), flush=True)


def run_engine(args, policies: list[str], env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--policies", *policies, "--model", args.model,
           "--batch", str(args.batch), "--steps", str(args.steps), "--prompt-len",
           str(args.prompt_len), "--budget", str(args.budget), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def plot(result: dict) -> None:
    plt = pyplot()

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        names = ["vanilla", *run["plugin"]]
        values = [run["vanilla"]["step_ms"]] + [v["step_ms"] for v in run["plugin"].values()]
        ax.bar(names, values, color=["#999999"] + ["#2a7ab0"] * (len(names) - 1))
        for i, (name, v) in enumerate(zip(names, values, strict=True)):
            ratio = run["ratio_over_streaming"].get(name)
            ax.text(i, v, f"{v:.0f}" + (f"\n{ratio:.2f}x" if ratio and name != "streaming" else ""),
                    ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("decode step (ms)")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        order = " (fixed order)" if run.get("order", "").startswith("fixed") else ""
        ax.set_title(f"batch {run['batch']}, prompt {run['prompt_len']}{order}", fontsize=10)
    cfg = result["config"]
    fig.suptitle(f"median decode step, CPU, budget {cfg['budget']}, {cfg['steps']} steps; "
                 "labels: ms and ratio over streaming", fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / f"{result['config']['name']}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--configs", nargs="+", default=["4x1024", "16x1024", "4x4096"],
                    help="BATCHxPROMPT_LEN")
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds over all policies, each in a rotated order")
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--name", default="decode_overhead",
                    help="docs/results/NAME.{json,png}: a partial rerun keeps the full table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs = []
    for config in args.configs:
        args.batch, args.prompt_len = map(int, config.split("x"))
        vanilla_run = run_engine(args, ["vanilla"], {"VLLM_PLUGINS": ""})
        vanilla = {**vanilla_run["policies"]["vanilla"],
                   "drift_probe_ms": vanilla_run["drift_probe_ms"]}
        plugin_run = run_engine(args, args.policies, {})
        plugin, drift = plugin_run["policies"], plugin_run["drift_probe_ms"]
        base = vanilla["step_ms"]
        streaming = plugin.get("streaming", {}).get("step_ms")
        runs.append({
            "batch": args.batch, "prompt_len": args.prompt_len, "vanilla": vanilla,
            "plugin": plugin, "drift_probe_ms": drift, "order": f"rotated over {args.repeats} rounds",
            "ratio_over_vanilla": {p: round(v["step_ms"] / base, 3) for p, v in plugin.items()},
            "ratio_over_streaming": ({p: round(v["step_ms"] / streaming, 3)
                                      for p, v in plugin.items()} if streaming else {})})
        print(config, json.dumps(runs[-1]["ratio_over_vanilla"]),
              json.dumps(runs[-1]["ratio_over_streaming"]), flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "batch", "prompt_len")}
    result = {"config": config, "runs": runs}
    print(write_json(args.name, result))
    plot(result)


if __name__ == "__main__":
    main()
