"""The quality benchmark's RULER samples through NVIDIA kvpress, for the same plot and table.

    .venv/bin/python -m benchmarks.quality.kvpress_run --tasks niah_single vt --context-lens 2k \
        --samples 1 --policies streaming snapkv --budgets 128 256

kvpress 0.5.5 runs in its own venv (.cache/kvpress-venv, built by benchmarks/kvpress_parity
if missing) on the same model directory, in float32 with SDPA attention. Each (sample, press,
budget) is one greedy `model.generate` of the same chat-formatted token ids the vLLM runner
sends (the RULER answer prefix continues the assistant turn), under `with press(model):`, so the
press compresses the whole prompt (question included) once, right after prefill. Its
compression ratio is 1 - budget / prompt tokens: it keeps the budget's count of entries per
layer and KV head, as our policy does. Unlike ours it never compacts again while decoding, which
makes no difference here: answers are at most --max-tokens long, less than our slack.

Rows go to the quality results file with policy "kvpress-<our name>" (and "kvpress-none", no
press: Hugging Face's full cache); rows already there are skipped, so a run resumes.

On another machine (a GPU with torch and transformers, no vLLM): `--write-spec F` writes the
jobs, token ids included, and stops; there, `python kvpress_run.py --worker F --device cuda
--model DIR > OUT` runs them; back here, `--import-outputs OUT --spec F` scores and records
the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # also runs as a plain script, in the kvpress venv
    sys.path.insert(0, str(ROOT))

KVPRESS_PREFIX = "kvpress-"
# Our policy -> kvpress press and the arguments that match our defaults (sinks 4; expected
# attention's 512 future positions). SnapKV and PyramidKV keep kvpress's own window 64 and
# kernel 5, which were ours until we measured a shorter window and no pooling to keep more
# (docs/quality.md, "SnapKV's observation window"). kvpress's H2O,
# ObservedAttentionPress (attention averaged over the queries that saw each key, at prefill),
# needs the attention weights, so its jobs run on an eager-attention copy of the model.
PRESSES: dict[str, tuple[str, dict[str, Any]]] = {
    "h2o": ("ObservedAttentionPress", {}),
    "expected_attention": ("ExpectedAttentionPress", {"n_sink": 4}),
    "streaming": ("StreamingLLMPress", {"n_sink": 4}),
    "snapkv": ("SnapKVPress", {"window_size": 64, "kernel_size": 5}),
    "pyramidkv": ("PyramidKVPress", {"window_size": 64, "kernel_size": 5}),
    "tova": ("TOVAPress", {}),
    "keydiff": ("KeyDiffPress", {}),
    "knorm": ("KnormPress", {}),
    "random": ("RandomPress", {}),
}
EAGER = {"h2o"}


# ====================================================================== kvpress side (its venv)

def worker(spec_path: str, device: str = "cpu", model_dir: str | None = None) -> None:
    """Reads jobs from the spec, writes one JSON line per finished job to stdout."""
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    spec = json.loads(Path(spec_path).read_text())
    model_dir = model_dir or spec["model"]
    torch.manual_seed(0)
    models: dict[str, Any] = {}

    def model_for(attention: str):
        if attention not in models:
            models[attention] = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation=attention).eval().to(device)
        return models[attention]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for job in spec["jobs"]:
        ids = torch.tensor([job["input_ids"]], device=device)
        generate = {"attention_mask": torch.ones_like(ids), "do_sample": False,
                    "max_new_tokens": spec["max_tokens"]}
        press, model = None, model_for("eager" if job["policy"] in EAGER else "sdpa")
        if job["policy"] != "none":
            name, kwargs = PRESSES[job["policy"]]
            ratio = max(0.0, 1.0 - job["budget"] / ids.shape[1])
            press = getattr(kvpress, name)(compression_ratio=ratio,
                                           **{**kwargs, **job.get("press_args", {})})
        started = time.perf_counter()
        with torch.no_grad():
            if press is None:
                out = model.generate(ids, **generate)
            else:
                with press(model):
                    out = model.generate(ids, **generate)
        new = out[0, ids.shape[1]:]
        print(json.dumps({"key": job["key"], "output": tokenizer.decode(new, skip_special_tokens=True),
                          "completion_tokens": int(new.shape[0]),
                          "latency_s": round(time.perf_counter() - started, 3),
                          "press": repr(press) if press is not None else None,
                          "device": torch.cuda.get_device_name() if device == "cuda" else device}),
              flush=True)


# ====================================================================== orchestration (.venv)

def chat_ids(tokenizer, sample: dict[str, Any], prefill: bool) -> list[int]:
    """The token ids vLLM's chat endpoint builds for the runner's request."""
    from benchmarks.quality.run import messages_for

    messages, extra = messages_for(sample, prefill)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=extra.get("add_generation_prompt", True),
        continue_final_message=extra.get("continue_final_message", False))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from benchmarks.kvpress_parity import kvpress_python
    from benchmarks.quality import tasks as ruler
    from benchmarks.quality.run import (
        ResultsWriter,
        labelled,
        model_tag_of,
        read_results,
        row_key,
        score,
    )

    unknown = [p for p in args.policies if p != "none" and p not in PRESSES]
    if unknown:
        sys.exit(f"kvpress_run: no kvpress press for {unknown}; choose from "
                 f"none {' '.join(PRESSES)}")
    press_args = json.loads(args.press_args) if args.press_args else {}
    samples = ruler.load_samples(args.tasks, args.context_lens, args.samples, args.model,
                                 args.seed, args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tag = model_tag_of(args.model)
    results = Path(args.results)
    done = {row_key(r) for r in read_results(results)}
    grid = [("none", None)] if "none" in args.policies else []
    grid += [(p, b) for p in args.policies if p != "none" for b in args.budgets]
    jobs, rows = [], {}
    for sample in samples:
        ids = None
        for policy, budget in grid:
            row_policy = KVPRESS_PREFIX + labelled(policy, args.label)
            if row_key({"model": tag, "id": sample["id"], "policy": row_policy,
                        "budget": budget}) in done:
                continue
            ids = ids if ids is not None else chat_ids(tokenizer, sample, not args.no_prefill)
            key = f"{sample['id']}|{policy}|{budget}"
            jobs.append({"key": key, "policy": policy, "budget": budget, "input_ids": ids,
                         "press_args": press_args.get(policy, {})})
            rows[key] = {"model": tag, "id": sample["id"], "task": sample["task"],
                         "ruler_task": sample["ruler_task"], "context_len": sample["context_len"],
                         "seed": sample["seed"], "policy": row_policy, "budget": budget,
                         "answers": sample["answers"], "prompt_tokens": len(ids),
                         "max_tokens": args.max_tokens, "prefill": not args.no_prefill}
            if policy in press_args:  # what the label stands for
                rows[key]["press_args"] = {policy: press_args[policy]}
    # Condition by condition (full cache, then the largest budget first, policies in the order
    # given), every sample of one before the next: a run cut short leaves whole cells.
    order = {p: i for i, p in enumerate(args.policies)}
    jobs.sort(key=lambda j: (j["budget"] is not None, -(j["budget"] or 0), order[j["policy"]]))
    print(f"[kvpress] {len(samples)} samples x {len(grid)} conditions; {len(jobs)} to run",
          flush=True)
    if not jobs:
        return {"rows_run": 0}
    # One spec per run (the pid), so runs of disjoint policies can share the results file.
    spec = Path(args.write_spec or results.with_suffix(f".kvpress-spec.{os.getpid()}.json"))
    spec.parent.mkdir(parents=True, exist_ok=True)  # a new machine has no .cache/quality yet
    spec.write_text(json.dumps({"model": str(Path(args.model).resolve()),
                                "max_tokens": args.max_tokens, "jobs": jobs, "rows": rows}))
    if args.write_spec:
        print(f"[kvpress] wrote {spec}: run it with --worker {spec.name} where kvpress is", flush=True)
        return {"rows_run": 0}
    python = kvpress_python()
    writer = ResultsWriter(results)
    bar = tqdm(total=len(jobs), desc="kvpress", unit="req", dynamic_ncols=True)
    finished = 0
    proc = subprocess.Popen([str(python), __file__, "--worker", str(spec)],
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if record(line, rows, writer, score):
                finished += 1
                bar.update(1)
    finally:
        bar.close()
        writer.close()
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    spec.unlink(missing_ok=True)
    if proc.returncode != 0:
        sys.exit(f"kvpress worker failed (exit {proc.returncode}) after {finished} rows; rerun "
                 "to resume")
    return {"rows_run": finished}


def record(line: str, rows: dict[str, dict[str, Any]], writer: Any, score: Any) -> bool:
    """Score one worker output line and write its row; False for a line that is not one."""
    if not line.startswith("{"):
        return False  # anything else a library printed
    out = json.loads(line)
    if out["key"] not in rows:
        raise KeyError(f"kvpress output for job {out['key']!r}, which is not in this spec")
    row = dict(rows[out["key"]])
    row.update(output=out["output"], score=score(out["output"], row["answers"]),
               completion_tokens=out["completion_tokens"], latency_s=out["latency_s"],
               press=out["press"], kvpress_device=out.get("device", "cpu"),
               time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    writer.write(row)
    return True


def import_outputs(args: argparse.Namespace) -> dict[str, Any]:
    """Record the outputs of a worker run elsewhere (--write-spec) into the results file."""
    from benchmarks.quality.run import ResultsWriter, read_results, row_key, score

    rows = json.loads(Path(args.spec).read_text())["rows"]
    done = {row_key(r) for r in read_results(Path(args.results))}
    writer, finished = ResultsWriter(Path(args.results)), 0
    try:
        for line in Path(args.import_outputs).read_text().splitlines():
            if line.startswith("{"):
                row = rows.get(json.loads(line)["key"])
                if row and row_key(row) in done:
                    continue
            finished += record(line, rows, writer, score)
    finally:
        writer.close()
    print(f"[kvpress] imported {finished} rows into {args.results}", flush=True)
    return {"rows_run": finished}


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.quality import run as vllm_run
    from benchmarks.quality import tasks as ruler

    p = argparse.ArgumentParser(description="RULER quality under kvpress presses (its own venv).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(vllm_run.DEFAULT_MODEL))
    p.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"])
    p.add_argument("--context-lens", nargs="+", default=["2k"], type=ruler.parse_context_len)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=ruler.DEFAULT_SEED)
    p.add_argument("--policies", nargs="+", default=["none", *PRESSES],
                   help="our policy names, mapped to kvpress presses; 'none' is HF's full cache")
    p.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--press-args", metavar="JSON",
                   help="per policy, press arguments over the matched ones, e.g. "
                        "'{\"snapkv\": {\"window_size\": 32}}'; use with --label")
    p.add_argument("--label", help="suffix for the policy names in the results "
                                   "(kvpress-POLICY:LABEL), naming this run's --press-args")
    p.add_argument("--results", default=str(vllm_run.DEFAULT_RESULTS))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--cache-dir", default=str(ruler.DEFAULT_CACHE))
    p.add_argument("--write-spec", metavar="FILE",
                   help="write the jobs to FILE and stop (to run them on another machine)")
    p.add_argument("--import-outputs", metavar="FILE",
                   help="record a worker's outputs (with --spec, the spec it ran)")
    p.add_argument("--spec", metavar="FILE", help="the spec --import-outputs belongs to")
    return p


def worker_main(argv: list[str]) -> None:
    """`--worker SPEC [--device cuda] [--model DIR]`: needs only torch, transformers, kvpress."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    a = p.parse_args(argv)
    worker(a.worker, a.device, a.model)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[1:])
    else:
        parsed = build_parser().parse_args()
        if parsed.import_outputs:
            if not parsed.spec:
                sys.exit("--import-outputs needs --spec, the spec file the worker ran")
            import_outputs(parsed)
        else:
            run(parsed)
