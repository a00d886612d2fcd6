"""Per-step decode time on CPU: vanilla vLLM vs the plugin with each policy, same machine, same run.

    .venv/bin/python benchmarks/decode_overhead.py [--model DIR] [--batch 4] [--steps 128]

Two offline engines in turn (each in its own process): vanilla vLLM (VLLM_PLUGINS="") and vLLM
with the plugin (server default "none", each batch choosing its policy via extra_args). For
each policy a batch of requests is decoded for `steps` tokens and every engine step after the
prefill is timed; the median step is reported (robust to the other work on a shared machine).
The steps include the compactions (every slack + 1 = 65 tokens). Writes docs/results/decode_overhead.{json,png}.
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

POLICIES = ["none", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "keydiff", "knorm"]


def worker(args) -> None:
    from vllm import LLM, SamplingParams

    engine = {"model": args.model, "enforce_eager": True, "max_model_len": 4096, "seed": 0}
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
    out = {}
    for policy in args.policies:
        steps = [t for _ in range(args.repeats) for t in decode_steps_ms(policy)]
        out[policy] = {"step_ms": round(statistics.median(steps), 3),
                       "p90_step_ms": round(sorted(steps)[int(0.9 * len(steps))], 3),
                       "steps_timed": len(steps)}
        print(policy, out[policy], flush=True)
    print("RESULT " + json.dumps(out), flush=True)


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

    names = ["vanilla", *result["plugin"]]
    values = [result["vanilla"]["step_ms"]] + [v["step_ms"] for v in result["plugin"].values()]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(names, values, color=["#999999"] + ["#2a7ab0"] * (len(names) - 1))
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    cfg = result["config"]
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"batch {cfg['batch']}, prompt {cfg['prompt_len']}, budget {cfg['budget']}, "
                 f"{cfg['steps']} steps, CPU", fontsize=10)
    fig.tight_layout()
    save_figure(fig, RESULTS / "decode_overhead.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    vanilla = run_engine(args, ["vanilla"], {"VLLM_PLUGINS": ""})["vanilla"]
    plugin = run_engine(args, args.policies, {})
    base = vanilla["step_ms"]
    result = {"config": {k: v for k, v in vars(args).items() if k != "worker"},
              "vanilla": vanilla, "plugin": plugin,
              "ratio_over_vanilla": {p: round(v["step_ms"] / base, 3) for p, v in plugin.items()}}
    print(write_json("decode_overhead", result))
    plot(result)
    print(json.dumps(result["ratio_over_vanilla"]))


if __name__ == "__main__":
    main()
