"""Quality under eviction: RULER samples through a real `vllm serve` with the plugin.

One server (started here, or reached with --url) runs with `--kv-eviction none`, so every
request picks its own policy and budget with `vllm_xargs`; the full-cache baseline is
`{"kv_eviction": "none"}` on the same server. Each (sample, policy, budget) is one greedy chat
request; its RULER score (the fraction of expected answers found in the output, case-insensitive,
RULER's `string_match_all`) goes to one JSON line of the results file. Rows already in the file
are skipped, so an interrupted run resumes where it stopped.

    .venv/bin/python -m benchmarks.quality.run --tasks niah_single niah_multikey \
        --context-lens 2k 4k --samples 5 --policies streaming --budgets 128 256 512 1024

Then `python -m benchmarks.quality.report` renders docs/results/quality.{md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python benchmarks/quality/run.py` works too
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import tasks as ruler  # noqa: E402
from benchmarks.quality.results import (  # noqa: E402,F401
    DEFAULT_RESULTS,
    ResultsWriter,
    read_results,
    row_key,
    score,
)
from tests.helpers.server import VllmServer  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "smollm2-135m-instruct"
FULL_CACHE = "none"  # the policy name that keeps every token
SERVER_ARGS = ["--kv-eviction", FULL_CACHE, "--enforce-eager",
               # Each request computes its whole prompt, so every condition's latency counts
               # the same prefill (a hit would select the same tokens: tests/test_prefix_cache).
               "--no-enable-prefix-caching"]
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}


# ----------------------------------------------------------------------- the server


def start_server(model: str, args: list[str], log_path: Path) -> VllmServer:
    """`vllm serve MODEL ARGS` on loopback; SERVER_ENV fills only variables the caller left unset."""
    defaults = {k: v for k, v in SERVER_ENV.items() if k not in os.environ}
    return VllmServer(model, args, log_path, env=defaults, start_timeout=600.0)


_DONE = re.compile(r"vllm-evict: request \S*?(q-[0-9a-f]{12})\S* done: policy=(\S+) budget=(\d+) "
                   r"logical_len=(\d+) kept=(\d+) evicted_tokens=(\d+)")


def evictions_from_log(text: str) -> dict[str, dict[str, Any]]:
    """Our request tag -> the plugin's end-of-request line (policy, lengths, evicted tokens)."""
    out = {}
    for tag, policy, budget, logical, kept, evicted in _DONE.findall(text):
        out[tag] = {"policy": policy, "budget": int(budget), "logical_len": int(logical),
                    "kept": int(kept), "evicted_tokens": int(evicted)}
    return out


# ----------------------------------------------------------------------- the run


def conditions(policies: Iterable[str], budgets: Iterable[int], full_cache: bool,
               ) -> list[tuple[str, int | None]]:
    """(policy, budget) pairs; the full cache is ("none", None)."""
    out: list[tuple[str, int | None]] = [(FULL_CACHE, None)] if full_cache else []
    for policy in policies:
        if policy == FULL_CACHE:
            if not full_cache:
                out.insert(0, (FULL_CACHE, None))
            continue
        out += [(policy, int(b)) for b in budgets]
    return out


def messages_for(sample: dict[str, Any], prefill: bool) -> tuple[list[dict], dict]:
    msgs = [{"role": "user", "content": sample["prompt"]}]
    if prefill and sample.get("answer_prefix"):
        # RULER puts the answer prefix at the start of the model's turn; vLLM continues it.
        msgs.append({"role": "assistant", "content": sample["answer_prefix"]})
        return msgs, {"continue_final_message": True, "add_generation_prompt": False}
    return msgs, {}


def labelled(policy: str, label: str | None) -> str:
    """The policy's name in the results: "tova:shared" for a run with --label shared (its
    --policy-args), so variants of one policy sit side by side; the full cache has no label."""
    return policy if label is None or policy == FULL_CACHE else f"{policy}:{label}"


async def _run_requests(url: str, model: str, model_tag: str, todo: list[tuple[dict, str, Any]],
                        writer: ResultsWriter, concurrency: int, max_tokens: int,
                        prefill: bool, timeout: float, server: VllmServer | None,
                        label: str | None = None, prefix_caching: bool = False,
                        server_args: str | None = "",
                        policy_args: dict[str, dict] | None = None) -> dict[str, Any]:
    import openai
    from tqdm.auto import tqdm

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                timeout=timeout)
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(todo), desc="quality", unit="req", dynamic_ncols=True)
    errors: list[str] = []
    totals: dict[tuple, list[float]] = defaultdict(list)
    tags: dict[tuple, list[str]] = defaultdict(list)

    async def one(sample: dict, policy: str, budget: int | None) -> None:
        xargs: dict[str, Any] = {"kv_eviction": policy}
        if budget is not None:
            xargs["kv_budget"] = budget
        msgs, extra = messages_for(sample, prefill)
        tag = f"q-{uuid.uuid4().hex[:12]}"
        async with sem:
            started = time.perf_counter()
            try:
                res = await client.chat.completions.create(
                    model=model, messages=msgs, max_tokens=max_tokens, temperature=0.0,
                    seed=0, extra_body={"vllm_xargs": xargs, "request_id": tag, **extra})
            except Exception as exc:  # noqa: BLE001 - reported below, the row is retried later
                errors.append(f"{sample['id']} {policy}/{budget}: {type(exc).__name__}: "
                              f"{str(exc)[:300]}")
                bar.update(1)
                if server is not None and not server.alive():
                    raise RuntimeError(f"vllm serve died; log {server.log_path}") from exc
                return
            latency = time.perf_counter() - started
        output = res.choices[0].message.content or ""
        details = getattr(res.usage, "prompt_tokens_details", None)
        row = {
            "model": model_tag, "id": sample["id"], "task": sample["task"],
            "ruler_task": sample["ruler_task"], "context_len": sample["context_len"],
            "seed": sample["seed"], "policy": labelled(policy, label), "budget": budget,
            "score": score(output, sample["answers"]), "answers": sample["answers"],
            "output": output, "prompt_tokens": res.usage.prompt_tokens,
            "completion_tokens": res.usage.completion_tokens,
            "finish_reason": res.choices[0].finish_reason, "latency_s": round(latency, 3),
            "max_tokens": max_tokens, "prefill": prefill, "request_tag": tag,
            "prefix_caching": prefix_caching, "server_args": server_args,
            # The prompt tokens served from the prefix cache (with --prefix-caching).
            "cached_prompt_tokens": getattr(details, "cached_tokens", None),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if policy in (policy_args or {}):  # what the label stands for
            row["policy_args"] = {policy: policy_args[policy]}
        writer.write(row)
        totals[(policy, budget)].append(row["score"])
        tags[(policy, budget)].append(tag)
        bar.update(1)

    async def leader_then_rest(group: list[tuple[dict, str, Any]]) -> None:
        async with samples_in_flight:
            await one(*group[0])
            await asyncio.gather(*(one(*item) for item in group[1:]))

    # With the prefix cache on, a sample's first request publishes its prompt's pages before the
    # sample's other conditions start, and at most `concurrency` samples are open at once, so
    # their pages stay cached until every condition has read them.
    samples_in_flight = asyncio.Semaphore(concurrency)
    try:
        if prefix_caching:
            await asyncio.gather(*(leader_then_rest(g) for g in by_sample(todo)))
        else:
            await asyncio.gather(*(one(s, p, b) for s, p, b in todo))
    finally:
        bar.close()
        await client.close()
    return {"errors": errors, "scores": totals, "tags": tags}


def by_sample(todo: list[tuple[dict, str, Any]]) -> list[list[tuple[dict, str, Any]]]:
    """The rows grouped by sample, in order of each sample's first row; within a group the
    full cache (which reads the whole prompt and publishes every page) leads."""
    groups: dict[str, list[tuple[dict, str, Any]]] = {}
    for item in todo:
        groups.setdefault(item[0]["id"], []).append(item)
    return [sorted(g, key=lambda item: item[1] != FULL_CACHE) for g in groups.values()]


def model_tag_of(model: str) -> str:
    return Path(model.rstrip("/")).name


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = Path(args.results)
    tokenizer = args.tokenizer or args.model
    started = time.perf_counter()
    samples = ruler.load_samples(args.tasks, args.context_lens, args.samples, tokenizer,
                                 args.seed, args.cache_dir)
    gen_s = time.perf_counter() - started
    grid = conditions(args.policies, args.budgets, not args.no_full_cache)
    tag = args.model_tag or model_tag_of(args.model)
    existing = read_results(results)
    done = {row_key(r) for r in existing}
    mismatched = {(r.get("max_tokens"), r.get("prefill")) for r in existing
                  if r.get("model") == tag} - {(args.max_tokens, not args.no_prefill)}
    if mismatched:
        print(f"[quality] warning: {results} holds rows made with other (max_tokens, prefill) "
              f"settings {sorted(mismatched, key=str)}; use another --results file to compare",
              file=sys.stderr)
    # Sample-major order, the tasks interleaved: a partial run covers every condition and every
    # task for the first samples.
    rank: dict[tuple, int] = defaultdict(int)
    for s in samples:
        s["_rank"] = rank[(s["task"], s["context_len"])]
        rank[(s["task"], s["context_len"])] += 1
    samples = sorted(samples, key=lambda s: s.pop("_rank"))  # stable: tasks stay in order
    # --server-arg reaches only a server started here; with --url they are unknown.
    recorded_args = " ".join(args.server_arg) if args.url is None else None
    todo = [(s, p, b) for s in samples for p, b in grid
            if row_key({"model": tag, "id": s["id"], "policy": labelled(p, args.label),
                        "budget": b, "server_args": recorded_args}) not in done]
    print(f"[quality] {len(samples)} samples x {len(grid)} conditions = "
          f"{len(samples) * len(grid)} rows; {len(samples) * len(grid) - len(todo)} already in "
          f"{results}; {len(todo)} to run (samples ready in {gen_s:.1f} s)", flush=True)
    summary: dict[str, Any] = {"rows_total": len(samples) * len(grid), "rows_run": 0,
                               "errors": [], "server_start_s": None, "requests_s": 0.0,
                               "todo": [(s["id"], p, b) for s, p, b in todo]}
    if args.dry_run:
        for sid, p, b in summary["todo"]:
            print(f"[quality] would run {sid} {p} {b}")
        return summary
    if not todo:
        return summary

    server: VllmServer | None = None
    url, model = args.url, args.model
    writer = ResultsWriter(results)
    t0 = None
    try:
        if url is None:
            log_path = Path(args.server_log or results.with_suffix(".server.log"))
            max_len = _max_model_len(args.model, args.max_model_len)
            base = ([a for a in SERVER_ARGS if a != "--no-enable-prefix-caching"]
                    + ["--enable-prompt-tokens-details"] if args.prefix_caching
                    else SERVER_ARGS)
            server_args = [*base, "--max-model-len", str(max_len), "--seed", "0",
                           *args.server_arg]
            if args.policy_args:
                server_args += ["--kv-policy-args", args.policy_args]
            print(f"[quality] starting: vllm serve {args.model} {' '.join(server_args)} "
                  f"(log {log_path})", flush=True)
            server = start_server(args.model, server_args, log_path)
            summary["server_start_s"] = round(server.start_seconds, 1)
            print(f"[quality] vllm serve healthy after {server.start_seconds:.0f} s", flush=True)
            url = server.url
        else:
            url = url.rstrip("/").removesuffix("/v1")
            model = args.served_model or _served_model(url)
        t0 = time.perf_counter()
        out = asyncio.run(_run_requests(
            url, model, tag, todo, writer, args.concurrency, args.max_tokens,
            not args.no_prefill, args.request_timeout, server, args.label,
            args.prefix_caching, recorded_args,
            json.loads(args.policy_args) if args.policy_args else None))
    finally:
        writer.close()
        if t0 is not None:
            summary["requests_s"] = round(time.perf_counter() - t0, 1)
        if server is not None:
            server.stop()
    summary["errors"] = out["errors"]
    summary["rows_run"] = len(todo) - len(out["errors"])
    # The plugin logs one line per finished request; with our own server, check that every
    # evicting request really evicted (its vllm_xargs arrived) and report what it kept.
    evictions = evictions_from_log(server.log()) if server is not None else {}
    summary["evictions"] = evictions
    print(f"[quality] {summary['rows_run']} rows in {summary['requests_s']:.0f} s "
          f"({summary['requests_s'] / max(1, len(todo)):.2f} s/request at concurrency "
          f"{args.concurrency}) -> {results}")
    for (policy, budget), scores in sorted(out["scores"].items(), key=lambda kv: str(kv[0])):
        seen = [evictions[t] for t in out["tags"][(policy, budget)] if t in evictions]
        kept = (f"; plugin: kept {sum(e['kept'] for e in seen) / len(seen):.0f} of "
                f"{sum(e['logical_len'] for e in seen) / len(seen):.0f} tokens (n={len(seen)})"
                if seen else "")
        print(f"[quality]   {policy:>12s} budget={str(budget):>5s}: "
              f"{100 * sum(scores) / len(scores):5.1f} (n={len(scores)}, this run){kept}")
    for err in out["errors"][:10]:
        print(f"[quality] error: {err}", file=sys.stderr)
    return summary


def _max_model_len(model: str, wanted: int) -> int:
    """`wanted`, capped at the model's trained length (vLLM refuses more without an override;
    SmolLM2 stops at 8192, which the 8k samples fit: RULER sizes them to 8192 minus the
    task's tokens_to_generate, more than the chat template and --max-tokens add)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return wanted
    trained = cfg.get("max_position_embeddings")
    if isinstance(trained, int) and trained < wanted:
        print(f"[quality] --max-model-len {wanted} capped at the model's "
              f"max_position_embeddings={trained}", flush=True)
        return trained
    return wanted


def _served_model(url: str) -> str:
    import httpx

    data = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return data[0]["id"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="RULER quality under KV eviction, through a real vllm serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory to serve")
    p.add_argument("--url", help="use this running server (started with --kv-eviction none) "
                                 "instead of starting one")
    p.add_argument("--served-model", help="model name on --url (default: its first model)")
    p.add_argument("--model-tag", help="model name in the results (default: the directory "
                                       "name of --model)")
    p.add_argument("--tokenizer", help="tokenizer for sizing the samples (default: --model)")
    p.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"],
                   help=f"of: {' '.join(ruler.TASK_NAMES)}")
    p.add_argument("--context-lens", nargs="+", default=["2k", "4k"], type=ruler.parse_context_len,
                   help="token budgets of the samples (RULER's: prompt + tokens_to_generate)")
    p.add_argument("--samples", type=int, default=5, help="samples per task and context length")
    p.add_argument("--seed", type=int, default=ruler.DEFAULT_SEED, help="RULER data seed")
    p.add_argument("--policies", nargs="+", default=["streaming"],
                   help="eviction policies the server offers (`vllm serve --help`)")
    p.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512, 1024],
                   help="kv_budget values (KV entries kept per layer and KV head)")
    p.add_argument("--policy-args", help="the server's --kv-policy-args JSON, e.g. "
                   '\'{"tova": {"heads": "shared"}}\'; use with --label')
    p.add_argument("--label", help="suffix for the policy names in the results (policy:LABEL), "
                                   "naming this run's --policy-args")
    p.add_argument("--no-full-cache", action="store_true",
                   help='skip the full-cache baseline (kv_eviction "none")')
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="results JSONL (appended)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per answer")
    p.add_argument("--no-prefill", action="store_true",
                   help="do not start the assistant turn with RULER's answer prefix")
    p.add_argument("--max-model-len", type=int, default=9000,
                   help="capped at the model's max_position_embeddings")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `vllm serve` argument (repeat; use --server-arg=--flag)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="leave vLLM's prefix cache on and run each sample's full cache first, "
                        "so the other conditions skip the prefill of the pages their policy "
                        "does not read (the same kept tokens: tests/test_prefix_cache.py); "
                        "latencies then no longer count the whole prefill")
    p.add_argument("--server-log", help="vllm serve log (default: RESULTS.server.log)")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--cache-dir", default=str(ruler.DEFAULT_CACHE), help="RULER sample cache")
    p.add_argument("--dry-run", action="store_true",
                   help="list the rows that would run (not in --results yet) and stop")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    summary = run(args)
    if summary["errors"]:
        raise SystemExit(f"{len(summary['errors'])} request(s) failed; rerun to retry them")
    return summary


if __name__ == "__main__":
    main()
