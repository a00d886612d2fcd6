"""Speculative decoding (ngram, which vLLM's CPU build runs) with eviction.

Drafts make a step compute several tokens, and the scheduler frees the lookahead pages of
rejected drafts every step; the worker trims its block-table row at every step too, from the
same formula, so both hold the same pages. The HF oracle must hold for every request. (The
tokens differ from decoding without drafts once eviction starts: a step that computes several
tokens moves the compaction points, which depend on the computed length at step boundaries.)
"""

from __future__ import annotations

import pytest

from tests.conftest import run_engine_job
from vllm_evict.core.dump import read_dump, records_for
from vllm_evict.core.oracle import compare, load_reference_model

pytestmark = pytest.mark.engine

# A slack of three pages: between compactions a request grows across page boundaries, where
# drafts' lookahead pages are allocated and, once rejected, freed.
SERVER = {"policy": "none", "budget": 64, "sink_tokens": 4, "window": 16, "slack": 96}
POLICIES = ["streaming", "h2o", "keydiff"]
STEPS = 240
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}


def _spec(model: str, speculative: bool) -> dict:
    engine = {"model": model, "max_model_len": 1024, "dtype": "float32", "enforce_eager": True,
              "seed": 0, "block_size": 32, "max_num_batched_tokens": 256,
              "additional_config": {"kv_eviction": SERVER}}
    if speculative:
        engine["speculative_config"] = NGRAM
    # Repetitive prompts, so the ngram proposer finds drafts and many are accepted.
    prompts = [[10 + (i * 7 + j) % (5 + i) for j in range(40)] for i in range(len(POLICIES))]
    return {"engine": engine, "requests": [
        {"prompt_token_ids": p, "extra_args": {"kv_eviction": policy},
         "sampling": {"max_tokens": STEPS, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}}
        for p, policy in zip(prompts, POLICIES, strict=True)]}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("speculative")
    spec = run_engine_job(_spec(tiny_model, True), work / "spec", dump_dir=work / "dump")
    return _spec(tiny_model, True), spec, read_dump(work / "dump")


def test_speculative_steps_compute_several_tokens(runs):
    _, spec, records = runs
    for result in spec["results"]:
        recs = records_for(records, result["request_id"])
        assert len(recs) >= 2
        # Between two compactions, more tokens were computed than engine steps ran.
        assert any(b["logical_len"] - a["logical_len"] > b["step"] - a["step"]
                   for a, b in zip(recs, recs[1:], strict=False)), recs


def test_speculative_eviction_matches_hf(runs, tiny_model):
    job, spec, records = runs
    hf = load_reference_model(tiny_model)
    for request, ours in zip(job["requests"], spec["results"], strict=True):
        assert len(ours["token_ids"]) == STEPS
        report = compare(hf, request["prompt_token_ids"], ours["token_ids"], ours["logprobs"],
                         records_for(records, ours["request_id"]))
        assert report["max_abs_dlogprob"] <= 1e-4, (request["extra_args"], report)
