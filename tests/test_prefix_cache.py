"""Prefix caching with eviction: evicting requests read and publish the prefix cache, and their
compactions never write into a cached or shared page (copy on write).

One plugin engine (prefix caching on, vLLM's default) runs batches one after the other; the
prefix cache is reset before each cold run. Requests share a 1,500-token prefix. A cached
evicting request must give exactly its cold tokens, and match Hugging Face with its kept mask;
a full-cache request that reuses the pages after evicting requests compacted must give vanilla
vLLM's tokens, which it cannot if a compaction had written into a cached page.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import run_engine_job
from vllm_evict.core.dump import read_dump, records_for
from vllm_evict.core.oracle import compare, load_reference_model

pytestmark = pytest.mark.engine

SNAP_WINDOW = 64  # snapkv reads this many of the prompt's last queries (more than its question)
SERVER = {"policy": "none", "budget": 64, "sink_tokens": 4, "window": 16, "slack": 16,
          "policy_args": {"snapkv": {"observation_window": SNAP_WINDOW}}}
PAGE = 32
TOLERANCE = 1e-4
PREFIX_LEN = 1500
SHARED_PAGES_TOKENS = PREFIX_LEN // PAGE * PAGE  # 1472: the full pages of the shared prefix


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


PREFIX = _tokens(100, PREFIX_LEN)
# name -> (prompt, vllm_xargs). snapkv's question is short, so its observation window
# reaches back into the shared pages and the hit must stop below it.
REQUESTS = {
    "tova_a": (PREFIX + _tokens(101, 40), {"kv_eviction": "tova", "kv_budget": 256}),
    "tova_b": (PREFIX + _tokens(102, 40), {"kv_eviction": "tova", "kv_budget": 256}),
    "snapkv": (PREFIX + _tokens(103, 20), {"kv_eviction": "snapkv", "kv_budget": 256}),
    "h2o": (PREFIX + _tokens(104, 40), {"kv_eviction": "h2o", "kv_budget": 256}),
    "full": (PREFIX + _tokens(105, 40), {"kv_eviction": "none"}),
}
SAMPLING = {"max_tokens": 60, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
# (phase name, requests, reset the prefix cache first)
PHASES = [
    ("cold", ["tova_b"], True),
    ("cold", ["snapkv"], True),
    ("cold", ["full"], True),
    ("publish", ["tova_a"], True),
    ("cached", ["tova_b"], False),
    ("cached", ["snapkv"], False),
    ("cached", ["h2o"], False),
    ("cached", ["full"], False),
    # Attention-statistic policies on the same cached pages at once, compacting in the same
    # step: each measures its own scores (the paged score buffer would mix them).
    ("together", ["tova_a", "tova_b", "snapkv"], False),
]


def _request(name: str, with_args: bool = True) -> dict:
    prompt, xargs = REQUESTS[name]
    return {"prompt_token_ids": prompt, "sampling": SAMPLING,
            "extra_args": xargs if with_args else None}


def _engine(model: str) -> dict:
    return {"model": model, "max_model_len": 2048, "dtype": "float32", "enforce_eager": True,
            "seed": 0, "block_size": PAGE, "max_num_batched_tokens": 256,
            "enable_prefix_caching": True}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("prefix_cache")
    engine = {**_engine(tiny_model), "additional_config": {"kv_eviction": SERVER}}
    spec = {"engine": engine, "phases": [
        {"requests": [_request(n) for n in names], "reset_prefix_cache": reset}
        for _, names, reset in PHASES]}
    out = run_engine_job(spec, work / "evict", dump_dir=work / "dump")
    vanilla = run_engine_job({"engine": _engine(tiny_model), "requests": [
        _request("full", with_args=False)]}, work / "vanilla", vanilla=True)
    keys = [(phase, name) for phase, names, _ in PHASES for name in names]
    results = dict(zip(keys, out["results"], strict=True))
    return {"results": results, "records": read_dump(work / "dump"),
            "vanilla": vanilla["results"][0], "log": out["log"]}


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return load_reference_model(tiny_model)


def test_cold_runs_miss_and_evicting_requests_publish(runs):
    r = runs["results"]
    assert all(r[("cold", n)]["num_cached_tokens"] == 0 for n in ("tova_b", "snapkv", "full"))
    assert r[("publish", "tova_a")]["num_cached_tokens"] == 0
    # tova_a compacted (it evicts) after publishing its prompt pages: tova_b hits all of them.
    assert records_for(runs["records"], r[("publish", "tova_a")]["request_id"])
    assert r[("cached", "tova_b")]["num_cached_tokens"] == SHARED_PAGES_TOKENS


def test_a_cached_evicting_request_gives_its_cold_tokens(runs):
    r = runs["results"]
    for name in ("tova_b", "snapkv"):
        cold, cached = r[("cold", name)], r[("cached", name)]
        assert cached["num_cached_tokens"] > 0, name
        assert records_for(runs["records"], cached["request_id"]), f"{name} never compacted"
        assert cached["token_ids"] == cold["token_ids"], name
        assert max(abs(a - b) for a, b in zip(cached["logprobs"], cold["logprobs"],
                                              strict=True)) <= TOLERANCE, name


def test_policies_sharing_cached_pages_at_once_keep_their_own_scores(runs):
    r = runs["results"]
    colds = {"tova_a": r[("publish", "tova_a")], "tova_b": r[("cold", "tova_b")],
             "snapkv": r[("cold", "snapkv")]}
    for name, cold in colds.items():
        together = r[("together", name)]
        assert together["num_cached_tokens"] > 0, name
        assert together["token_ids"] == cold["token_ids"], name


def test_a_hit_never_covers_a_prompt_query_the_policy_reads(runs):
    """snapkv reads the prompt's last 64 queries: 1,520 - 64 = 1,456, so the hit stops at 45
    pages (1,440) although 46 are cached. h2o accumulates over every prompt query: no hit."""
    r = runs["results"]
    prompt_len = len(REQUESTS["snapkv"][0])
    assert r[("cached", "snapkv")]["num_cached_tokens"] == (prompt_len - SNAP_WINDOW) // PAGE * PAGE
    assert r[("cached", "h2o")]["num_cached_tokens"] == 0


def test_a_cached_evicting_request_matches_hf_with_its_kept_mask(runs, hf_model):
    result = runs["results"][("cached", "tova_b")]
    records = records_for(runs["records"], result["request_id"])
    assert len(records) >= 2
    prompt = REQUESTS["tova_b"][0]
    report = compare(hf_model, prompt, result["token_ids"], result["logprobs"], records)
    assert report["max_abs_dlogprob"] <= TOLERANCE, report
    ignored = compare(hf_model, prompt, result["token_ids"], result["logprobs"], [])
    assert ignored["max_abs_dlogprob"] > 100 * TOLERANCE, ignored  # negative control


def test_the_cache_is_never_written_by_a_compaction(runs):
    """After three evicting requests compacted over the shared pages, a full-cache request that
    reuses them gives vanilla vLLM's tokens (a cold vanilla engine)."""
    cached, vanilla = runs["results"][("cached", "full")], runs["vanilla"]
    assert cached["num_cached_tokens"] == SHARED_PAGES_TOKENS
    assert cached["token_ids"] == vanilla["token_ids"]
    assert max(abs(a - b) for a, b in zip(cached["logprobs"], vanilla["logprobs"],
                                          strict=True)) <= TOLERANCE
    assert runs["results"][("cold", "full")]["token_ids"] == vanilla["token_ids"]


def test_a_prompt_that_fills_the_pool_compacts_without_preempting_itself(tiny_model, tmp_path):
    """24 pages (23 usable) and a 680-token prompt (22 pages): the first compaction finds no
    free pages to copy into, so it reuses the request's own pages (taken out of the prefix
    cache). Before, the request preempted itself at every decode step. Its tokens must be
    those of the same request with prefix caching off (compaction in place)."""
    prompt = _tokens(300, 680)
    sampling = {**SAMPLING, "max_tokens": 40}
    request = {"prompt_token_ids": prompt, "sampling": sampling,
               "extra_args": {"kv_eviction": "tova", "kv_budget": 128}}
    outputs = {}
    for caching in (True, False):
        engine = {**_engine(tiny_model), "max_model_len": 736, "num_gpu_blocks_override": 24,
                  "enable_prefix_caching": caching, "additional_config": {"kv_eviction": SERVER}}
        out = run_engine_job({"engine": engine, "requests": [request]},
                             tmp_path / f"caching-{caching}", timeout=300)
        assert "preempted" not in out["log"], out["log"][-2000:]
        outputs[caching] = out["results"][0]
    assert len(outputs[True]["token_ids"]) == 40
    assert outputs[True]["token_ids"] == outputs[False]["token_ids"]
