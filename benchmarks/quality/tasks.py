"""RULER samples, generated offline by NVIDIA's own generators, cached as JSONL.

The generator is NVIDIA's RULER as packaged on PyPI by NeMo Evaluator:
`nvidia-long-context-eval==26.3` (Apache-2.0; install it with `--no-deps`, see docs/quality.md).
Its per-task scripts (`long_context_eval/data/synthetic/{niah,variable_tracking,
common_words_extraction}.py`), task settings (`synthetic.yaml`), prompt templates
(`constants.py`) and haystack data (Paul Graham essays, shipped in the wheel) are used as they
are. We run each script in-process with `runpy` (they parse argv at import), not through its
`prepare.py`, because prepare.py shells out to `python`, reports success when it wrote nothing,
and sizes essay haystacks in 500-word steps (a "2k" NIAH sample came out at 1455 tokens).

What is ours:
- NIAH sizing: the largest haystack (in words or sentences) whose sample, answers included,
  plus the task's `tokens_to_generate` fits `context_len` (RULER's own rule), found by
  bisection instead of RULER's coarse steps. vt and cwe use the package's own sizing loops,
  which already step finely.
- RULER's `base` template is the task template followed by the answer prefix ("The special
  magic number for X mentioned in the provided text is"). We split each sample where that
  prefix begins (its last occurrence: vt and cwe carry a solved example before the question):
  `prompt` is the user message and `answer_prefix` is kept separately, so the runner can
  prefill it as the start of the assistant turn, as RULER does with chat models.
- NLTK's `punkt_tab` data is on no package registry. Empty parameter files give an untrained
  Punkt model that splits sentences on ". ", which is all the needle insertion needs.
- Seeded and deterministic: the package seeds `random`/`numpy` at import with our seed, and the
  calls we make are the same every time. Sample i does not depend on how many samples were
  asked for, so a cache of N samples serves any request for <= N.

    .venv/bin/python -m benchmarks.quality.tasks --tokenizer models/smollm2-135m-instruct \
        --tasks niah_single niah_multikey --context-lens 2k 4k --samples 5

The essays are copyrighted: the JSONL goes to .cache/ruler/ (gitignored), never into git.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.quality.ruler_package import (  # noqa: E402
    TaskError,
    _package_dir,
    _ruler_config,
    _ruler_script,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".cache" / "ruler"
DEFAULT_SEED = 42  # RULER's own default

# Short names -> the RULER task they run. The RULER names themselves are accepted too.
ALIASES = {
    "niah_single": "niah_single_2",  # essay haystack, word key, 7-digit number value
    "niah_multikey": "niah_multikey_1",  # essay haystack, 4 keys, 1 asked
    "niah_multivalue": "niah_multivalue",  # 4 values for one key
    "niah_multiquery": "niah_multiquery",  # 4 keys asked at once
    "vt": "vt",  # variable tracking, 1 chain of 4 hops
    "cwe": "cwe",  # common-word extraction, top 10
}
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
               "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
               "vt", "cwe")
TASK_NAMES = tuple(ALIASES) + tuple(t for t in RULER_TASKS if t not in ALIASES)


def resolve(task: str) -> str:
    """The RULER task a (short or RULER) name stands for."""
    if task in ALIASES:
        return ALIASES[task]
    if task in RULER_TASKS:
        return task
    raise TaskError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}")


def parse_context_len(value: str | int) -> int:
    """`2k` -> 2048, `4096` -> 4096."""
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def context_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _niah(g: dict[str, Any], num_samples: int, max_len: int, to_generate: int,
          ) -> list[tuple[str, list[str], int]]:
    """NIAH samples at the largest haystack that fits, found by doubling + bisection."""
    generate, count = g["generate_input_output"], g["TOKENIZER"].text_to_tokens
    limit = len(g["haystack"]) if g["args"].type_haystack == "essay" else 10**9

    def fits(size: int) -> bool:
        text, answers = generate(size)
        return len(count(text + " ".join(answers))) + to_generate <= max_len

    if not fits(1):
        raise TaskError(f"context_len {max_len} is too short for this task's template")
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)

    samples = []
    for _ in range(num_samples):
        size = lo
        while True:  # a sample's needles vary in length: shrink until it fits (as RULER does)
            text, answers = generate(size)
            length = len(count(text)) + to_generate
            if length <= max_len or size <= 1:
                break
            size = max(1, size - max(1, lo // 100))
        samples.append((text, answers, length))
    return samples


# vt and cwe prepend a solved example (vt's alone is sized to 500 tokens); below these lengths
# the package's sample loops never find a fitting sample and spin forever.
MIN_CONTEXT = {"variable_tracking": 1024, "common_words_extraction": 1024}


def _ruler_samples(ruler_task: str, context_len: int, num_samples: int, tokenizer: str,
                   seed: int, cache_dir: Path) -> list[dict[str, Any]]:
    cfg = _ruler_config(ruler_task)
    if context_len < MIN_CONTEXT.get(cfg["task"], 0):
        raise TaskError(f"{ruler_task} needs context_len >= {MIN_CONTEXT[cfg['task']]}; "
                        f"got {context_len}")
    answer_prefix = cfg.get("answer_prefix", "")
    template = cfg["template"] + answer_prefix  # RULER's `base` model template
    head = answer_prefix.split("{")[0]  # the constant start of the formatted prefix
    script = _package_dir() / "data" / "synthetic" / f"{cfg['task']}.py"
    argv = ["--save_dir", str(cache_dir / "unused"), "--save_name", ruler_task,
            "--tokenizer_path", tokenizer, "--tokenizer_type", "hf",
            "--max_seq_length", str(context_len),
            "--tokens_to_generate", str(cfg["tokens_to_generate"]),
            "--num_samples", str(num_samples), "--random_seed", str(seed),
            "--template", template]
    for key, value in cfg["args"].items():
        argv += [f"--{key}", str(value)]
    with _ruler_script(script, argv, cache_dir) as g:
        count = g["TOKENIZER"].text_to_tokens
        if cfg["task"] == "niah":
            rows = _niah(g, num_samples, context_len, cfg["tokens_to_generate"])
        elif cfg["task"] == "variable_tracking":  # the script's main(), minus the file write
            icl = g["sys_vartrack_w_noise_random"](
                num_samples=1, max_seq_length=500, incremental=5,
                num_chains=cfg["args"]["num_chains"], num_hops=cfg["args"]["num_hops"])[0]
            rows = g["sys_vartrack_w_noise_random"](
                num_samples=num_samples, max_seq_length=context_len,
                num_chains=cfg["args"]["num_chains"], num_hops=cfg["args"]["num_hops"],
                icl_example=icl)
        elif cfg["task"] == "common_words_extraction":
            rows = g["sys_word_pair_random"](num_samples=num_samples,
                                             max_seq_length=context_len, save_dir=None)
        else:  # pragma: no cover - RULER_TASKS lists only the three kinds above
            raise TaskError(f"unsupported RULER task kind {cfg['task']}")
    if cfg["task"] != "niah":
        rows = [(r["input"], list(r["outputs"]), r["length"]) for r in rows]

    samples = []
    for i, (text, answers, _) in enumerate(rows):
        cut = text.rfind(head) if head else len(text)
        if cut <= 0 or len(text) - cut > len(head) + 200:
            raise TaskError(f"{ruler_task}: answer prefix {head!r} not found at the end of "
                            f"sample {i}")
        samples.append({"index": i, "prompt": text[:cut].strip(), "answer_prefix": text[cut:].strip(),
                        "answers": [str(a) for a in answers],
                        "input_tokens": len(count(text)),
                        "tokens_to_generate": cfg["tokens_to_generate"]})
    return samples


# ----------------------------------------------------------------------- cache + public API


def tokenizer_tag(tokenizer: str | Path) -> str:
    """A cache key for a tokenizer directory: its name plus a hash of its tokenizer files."""
    path = Path(tokenizer)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (path / name).exists():
            h.update(name.encode() + (path / name).read_bytes())
    return f"{path.name}-{h.hexdigest()[:10]}"


def sample_id(task: str, context_len: int, seed: int, index: int) -> str:
    return f"{task}-{context_label(context_len)}-s{seed}-{index}"


def generate(task: str, context_len: int | str, num_samples: int, tokenizer: str | Path,
             seed: int = DEFAULT_SEED, cache_dir: str | Path = DEFAULT_CACHE,
             ) -> list[dict[str, Any]]:
    """`num_samples` samples of `task` at `context_len` tokens (RULER's budget: prompt, answer
    prefix and the task's tokens_to_generate), each {id, task, context_len, prompt,
    answer_prefix, answers, ...}. Cached in `cache_dir/<tokenizer tag>/`."""
    ruler_task = resolve(task)
    context_len = parse_context_len(context_len)
    cache_dir = Path(cache_dir)
    tokenizer = str(Path(tokenizer).resolve())
    path = cache_dir / tokenizer_tag(tokenizer) / f"{ruler_task}-{context_len}-s{seed}.jsonl"
    cached: list[dict[str, Any]] = []
    if path.exists():
        cached = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(cached) < num_samples:
        cached = _ruler_samples(ruler_task, context_len, num_samples, tokenizer, seed, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in cached))
        tmp.replace(path)
    return [{"id": sample_id(task, context_len, seed, s["index"]), "task": task,
             "ruler_task": ruler_task, "context_len": context_len, "seed": seed, **s}
            for s in cached[:num_samples]]


def load_samples(tasks: Iterable[str], context_lens: Iterable[int | str], num_samples: int,
                 tokenizer: str | Path, seed: int = DEFAULT_SEED,
                 cache_dir: str | Path = DEFAULT_CACHE) -> list[dict[str, Any]]:
    """Every (task, context length) combination, in that order."""
    out: list[dict[str, Any]] = []
    for task in tasks:
        for n in context_lens:
            out += generate(task, n, num_samples, tokenizer, seed, cache_dir)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate (and cache) RULER samples offline.")
    p.add_argument("--tokenizer", default=str(ROOT / "models" / "smollm2-135m-instruct"),
                   help="HF tokenizer directory (default: models/smollm2-135m-instruct)")
    p.add_argument("--tasks", nargs="+", default=list(ALIASES), metavar="TASK",
                   help=f"default: {' '.join(ALIASES)}; also: "
                        f"{' '.join(t for t in TASK_NAMES if t not in ALIASES)}")
    p.add_argument("--context-lens", nargs="+", default=["2k", "4k", "8k"])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--show", action="store_true", help="print the first sample of each file")
    args = p.parse_args(argv)
    for task in args.tasks:
        for n in map(parse_context_len, args.context_lens):
            started = time.perf_counter()
            samples = generate(task, n, args.samples, args.tokenizer, args.seed, args.cache_dir)
            lens = [s["input_tokens"] for s in samples]
            print(f"{task:16s} {context_label(n):>4s}: {len(samples)} samples, input tokens "
                  f"{min(lens)}-{max(lens)}, answers e.g. {samples[0]['answers']} "
                  f"({time.perf_counter() - started:.1f} s)")
            if args.show:
                s = samples[0]
                print(f"  prompt: {s['prompt'][:200]!r} ... {s['prompt'][-200:]!r}\n"
                      f"  answer_prefix: {s['answer_prefix']!r}")


if __name__ == "__main__":
    main()
