"""The main job: a real `vllm serve` with eviction on a small real model, answering a long prompt.

    .venv/bin/python scripts/demo.py [--model models/smollm2-135m-instruct] [--budget 512]

Starts `vllm serve MODEL --kv-eviction streaming --kv-budget N`, sends a ~3,000-token chat
prompt once with the server's eviction and once with the full cache (vllm_xargs
{"kv_eviction": "none"}), prints both answers, and shows what the plugin evicted and how many
pages went back to vLLM's pool, from the server's own log.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from tests.helpers.server import VllmServer  # noqa: E402

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Perth", "Quito", "Tunis", "Riga", "Seoul"]


def long_prompt(lines: int = 160, seed: int = 0) -> str:
    rng = random.Random(seed)
    log = [f"Day {d}: truck {rng.randrange(10, 99)} delivered {rng.randrange(2, 40)} boxes of "
           f"tea to {rng.choice(CITIES)}." for d in range(1, lines + 1)]
    log.append(f"Day {lines + 1}: truck 7 delivered 12 boxes of tea to Reykjavik.")
    return ("Here is a delivery log.\n" + "\n".join(log) +
            f"\n\nQuestion: on day {lines + 1}, which city received the tea? Answer in one word.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--budget", type=int, default=512)
    args = ap.parse_args()

    log_path = ROOT / ".cache" / "demo-serve.log"
    serve_args = ["--enforce-eager", "--max-model-len", "8192", "--kv-eviction", "streaming",
                  "--kv-budget", str(args.budget), "--kv-window", "64", "--kv-slack", "64"]
    print(f"$ vllm serve {args.model} {' '.join(serve_args)}   (log: {log_path})")
    server = VllmServer(args.model, serve_args, log_path)
    try:
        print(f"server healthy after {server.start_seconds:.1f} s")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        prompt = long_prompt()
        for label, xargs in (("streaming eviction", None), ("full cache", {"kv_eviction": "none"})):
            started = time.perf_counter()
            res = client.chat.completions.create(
                model=args.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=24, temperature=0.0,
                extra_body={"vllm_xargs": xargs} if xargs else None)
            print(f"\n[{label}] prompt {res.usage.prompt_tokens} tokens, "
                  f"{time.perf_counter() - started:.1f} s")
            print(f"  answer: {res.choices[0].message.content.strip()!r}")
        time.sleep(1.0)
        done = re.findall(r"vllm-evict: request .*", server.log())
        print("\nWhat the plugin did (server log):")
        for line in done:
            print("  " + line)
        if not done:
            raise SystemExit("no eviction was logged: something is wrong")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
