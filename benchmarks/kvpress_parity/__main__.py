"""Run the parity benchmark: `.venv/bin/python -m benchmarks.kvpress_parity` (see __init__)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.kvpress_parity import ARGS, CACHE, MODEL, POLICIES, ROOT, args_label
from benchmarks.kvpress_parity import __doc__ as DOC
from benchmarks.kvpress_parity.attribution import compare_case
from benchmarks.kvpress_parity.inputs import (
    _same,
    build_prompt,
    essay_text,
    kvpress_python,
    run_ours,
)
from benchmarks.kvpress_parity.report import label, plot, write_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=DOC.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=1536)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--pyramid-long", type=str, nargs="*", default=["0.5:3072", "0.75:5632"],
                        help="extra pyramidkv cases RATIO:TOKENS on prompts long enough for "
                             "kvpress's pyramid (L x (1 - ratio) >= 1280)")
    parser.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--work", type=Path, default=CACHE / "kvpress-parity")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the scratch results of an earlier run with the same inputs")
    args = parser.parse_args()

    started_all = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from importlib.metadata import version

    import torch
    from transformers import AutoTokenizer

    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} is missing: run .venv/bin/python scripts/prepare_models.py")
    python = kvpress_python()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text, source = essay_text()
    prompts = {"main": build_prompt(tokenizer, text, args.prompt_tokens)}
    cases = [{"policy": p, "ratio": r, "prompt": "main", "args": a} for r in args.ratios
             for p in args.policies for a in ARGS[p]]
    if "pyramidkv" in args.policies:
        for item in args.pyramid_long:
            ratio, tokens = item.split(":")
            name = f"long{tokens}"
            prompts.setdefault(name, build_prompt(tokenizer, text, int(tokens)))
            cases.append({"policy": "pyramidkv", "ratio": float(ratio), "prompt": name,
                          "args": ARGS["pyramidkv"][0]})
    for case in cases:
        case["kv_key"] = f"{case['policy']}-{case['ratio']}-{case['prompt']}"  # kvpress's run
        case["key"] = f"{case['kv_key']}-{args_label(case['args'])}"
        case["length"] = len(prompts[case["prompt"]])
    print(f"prompts: {', '.join(f'{k}={len(v)} tokens' for k, v in prompts.items())}; "
          f"{len(cases)} cases", flush=True)

    # kvpress first: its kept counts set our budgets
    kv_cases = {c["kv_key"]: {"key": c["kv_key"], **{k: c[k] for k in ("policy", "ratio", "prompt")}}
                for c in cases}  # one kvpress run per press, ratio and prompt
    spec = {"model": str(MODEL), "prompts": prompts, "cases": list(kv_cases.values())}
    spec_text, kvp_out = json.dumps(spec), args.work / "kvpress-out.json"
    started = time.perf_counter()
    if not (args.reuse and _same(args.work / "kvpress-spec.json", spec_text) and kvp_out.exists()):
        kvp_out.unlink(missing_ok=True)
        (args.work / "kvpress-spec.json").write_text(spec_text)
        with (args.work / "kvpress.log").open("w") as log:
            proc = subprocess.run([str(python), "-m", "benchmarks.kvpress_parity.kvpress_worker",
                                   str(args.work / "kvpress-spec.json"), str(kvp_out)], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=3000,
                                  env={**os.environ, "PYTHONPATH": "", "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            sys.exit(f"kvpress worker failed; see {args.work / 'kvpress.log'}")
        (args.work / "kvpress_wall_s").write_text(str(time.perf_counter() - started))
    kvpress_s = float((args.work / "kvpress_wall_s").read_text())
    kvp = json.loads((args.work / "kvpress-out.json").read_text())
    kvp_cases = {c["key"]: c for c in kvp["cases"]}
    print(f"kvpress side done in {kvpress_s:.0f} s", flush=True)
    budgets = {}
    for case in cases:
        layers = kvp_cases[case["kv_key"]]["layers"]
        if not all(entry["verified"] for entry in layers):
            sys.exit(f"{case['key']}: could not reproduce kvpress's kept indices from its scores")
        budgets[case["key"]] = layers[0]["n_kept"]  # uniform presses: every layer the same
        case["budget"] = budgets[case["key"]]
        case["press"] = kvp_cases[case["kv_key"]]["press"]

    started = time.perf_counter()
    ours, ours_timings = run_ours(cases, prompts, budgets, args.work, args.reuse)
    ours_s = sum(t["wall_s"] for t in ours_timings.values())
    print(f"vLLM side done in {ours_s:.0f} s", flush=True)

    started = time.perf_counter()
    probes = {name: torch.load(args.work / f"probe-{name}.pt") for name in prompts}
    results = [compare_case(case, kvp_cases[case["kv_key"]]["layers"], ours[case["key"]],
                            probes[case["prompt"]]) for case in cases]
    report = {
        "model": MODEL.name, "prompt_source": source,
        "prompt_tokens": {k: len(v) for k, v in prompts.items()},
        "versions": {"kvpress": kvp["versions"],
                     "ours": {"vllm": version("vllm"), "torch": torch.__version__}},
        "method": ("Jaccard of the kept index sets per (layer, KV head) right after prefill; "
                   "ours from the plugin's VLLM_EVICT_DUMP_DIR dump of a real vLLM engine "
                   "(slack=0, one prefill chunk), kvpress from its compress() (captured scores, "
                   "top-k with compress's count, verified against the keys it returned)"),
        "timings": {"kvpress": {"load_s": kvp["load_s"], "probes": kvp["probes"],
                                "cases_s": {c["key"]: c["seconds"] for c in kvp["cases"]}},
                    "kvpress_total_s": kvpress_s, "ours": ours_timings, "ours_total_s": ours_s,
                    "analysis_s": time.perf_counter() - started},
        "cases": results,
    }
    (args.out_dir / "kvpress_parity.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out_dir / "kvpress_parity.png")
    write_markdown(report, args.out_dir / "kvpress_parity.md")
    for r in results:
        c = {k: "  -  " if v is None else f"{v['mean']:.3f}" for k, v in r["checks"].items()}
        print(f"{label(r):48s} mean {r['mean']:.3f} min {r['min']:.3f} | numerics "
              f"{c['ours_vllm_vs_ours_on_hf']} definition {c['kvpress_vs_ours_on_hf']} "
              f"replica {c['kvpress_vs_kvpress_replica']}")
    print(f"wrote {args.out_dir / 'kvpress_parity.md'} ({time.perf_counter() - started_all:.0f} s)")


if __name__ == "__main__":
    main()
