"""Run one offline vLLM engine over a list of requests and write the results as JSON.

    python -m tests.helpers.engine_job SPEC.json OUT.json

SPEC: {"engine": {LLM kwargs}, "requests": [{"prompt_token_ids": [...], "sampling": {...},
"extra_args": {...} | null}]}, or {"engine": ..., "phases": [{"requests": [...],
"reset_prefix_cache": bool}]} to run batches one after the other (results in order, each with
its phase and its prefix-cache hit, `num_cached_tokens`). Run in a subprocess so each engine gets a clean process (and
so VLLM_PLUGINS="" gives true vanilla vLLM for comparisons).
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    started = time.perf_counter()
    llm = LLM(**spec["engine"])
    init_s = time.perf_counter() - started
    phases = spec.get("phases") or [{"requests": spec["requests"]}]
    started = time.perf_counter()
    results = []
    for phase, batch in enumerate(phases):
        if batch.get("reset_prefix_cache"):
            assert llm.reset_prefix_cache(), "the prefix cache could not be reset"
        params = [SamplingParams(**r["sampling"], extra_args=r.get("extra_args"))
                  for r in batch["requests"]]
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in batch["requests"]]
        for out in llm.generate(prompts, params, use_tqdm=False):
            completion = out.outputs[0]
            logprobs = None
            if completion.logprobs is not None:
                logprobs = [step[tok].logprob for tok, step in
                            zip(completion.token_ids, completion.logprobs, strict=True)]
            results.append({"request_id": out.request_id, "token_ids": list(completion.token_ids),
                            "logprobs": logprobs, "phase": phase,
                            "num_cached_tokens": out.num_cached_tokens})
    generate_s = time.perf_counter() - started
    with open(out_path, "w") as f:
        json.dump({"init_s": init_s, "generate_s": generate_s, "results": results}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
