"""Prefill eviction: compaction between prefill chunks, at fixed logical points.

A server whose every request is bounded (prefill eviction on, requests may not opt out) starts
with a KV pool smaller than one max_model_len, which vanilla vLLM refuses, and serves a prompt
four times larger than the whole pool. Its kept sets match Hugging Face with the kept mask
across the chunk compactions, and its tokens are the same alone and under load.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import run_engine_job
from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.dump import read_dump, read_page_trace, records_for
from vllm_evict.core.oracle import compare, load_reference_model

pytestmark = pytest.mark.engine

PAGE = 32
POOL_PAGES = 24  # 768 tokens: the whole KV pool
PROMPT_LEN = 4 * POOL_PAGES * PAGE  # 3,072 tokens
TOLERANCE = 1e-4
SERVER = {"policy": "snapkv", "budget": 128, "sink_tokens": 4, "window": 16, "slack": 16,
          "prefill_eviction": True, "prefill_chunk": 64, "request_override": "deny"}
SAMPLING = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


LONG = _tokens(200, PROMPT_LEN)
OTHERS = [_tokens(201, 700), _tokens(202, 900)]


def _engine(model: str, server: dict | None, pool_pages: int = POOL_PAGES) -> dict:
    engine = {"model": model, "max_model_len": PROMPT_LEN + 128, "dtype": "float32",
              "enforce_eager": True, "seed": 0, "block_size": PAGE,
              "max_num_batched_tokens": 256, "num_gpu_blocks_override": pool_pages}
    if server is not None:
        engine["additional_config"] = {"kv_eviction": server}
    return engine


def _request(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt, "sampling": SAMPLING, "extra_args": None}


@pytest.fixture(scope="module")
def bounded(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("prefill_eviction")
    spec = {"engine": _engine(tiny_model, SERVER), "phases": [
        {"requests": [_request(LONG)], "reset_prefix_cache": True},
        {"requests": [_request(p) for p in (OTHERS[0], LONG, OTHERS[1])],
         "reset_prefix_cache": True},
    ]}
    out = run_engine_job(spec, work / "evict", dump_dir=work / "dump",
                         page_trace_dir=work / "pages")
    return {"alone": out["results"][0], "loaded": out["results"][2],
            "records": read_dump(work / "dump"), "pages": read_page_trace(work / "pages"),
            "log": out["log"]}


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return load_reference_model(tiny_model)


def test_vanilla_cannot_start_with_this_pool(tiny_model, tmp_path):
    with pytest.raises(AssertionError, match="To serve at least one request with the model's "
                                             "max seq len"):
        run_engine_job({"engine": _engine(tiny_model, None), "requests": []},
                       tmp_path / "vanilla", vanilla=True, timeout=300)


def test_the_check_is_relaxed_only_when_every_request_is_bounded(tiny_model, tmp_path):
    """Requests that may opt out could need the whole max_model_len: vLLM's check stands."""
    open_server = {**SERVER, "request_override": "allow"}
    with pytest.raises(AssertionError, match="max seq len"):
        run_engine_job({"engine": _engine(tiny_model, open_server), "requests": []},
                       tmp_path / "open", timeout=300)


def test_a_prompt_four_times_the_pool_is_served(bounded):
    alone = bounded["alone"]
    assert len(alone["token_ids"]) == SAMPLING["max_tokens"]
    records = records_for(bounded["records"], alone["request_id"])
    cfg = EvictionConfig(**SERVER)
    prefill = [r["logical_len"] for r in records if r["logical_len"] < PROMPT_LEN]
    # Compacted at every multiple of 64 from the first past the cap (144) to the prompt's end.
    assert prefill == list(range(cfg.first_prefill_point, PROMPT_LEN, cfg.prefill_chunk))
    for rec in records:
        assert all(len(head) == cfg.physical_length(rec["logical_len"], PROMPT_LEN)
                   for layer in rec["kept"] for head in layer)


def test_the_peak_stays_within_budget_slack_and_chunk(bounded):
    """From the scheduler's own block lists at every step (VLLM_EVICT_PAGE_TRACE_DIR)."""
    alone = bounded["alone"]
    steps = records_for(bounded["pages"], alone["request_id"])
    cfg = EvictionConfig(**SERVER)
    # The trace covers the whole request: every prefill chunk and every output token.
    assert steps[-1]["logical_len"] == PROMPT_LEN + SAMPLING["max_tokens"] - 1
    assert {s["logical_len"] for s in steps} >= set(range(cfg.first_prefill_point, PROMPT_LEN,
                                                          cfg.prefill_chunk))
    bound = -(-(cfg.cap + cfg.prefill_chunk) // PAGE)
    assert max(s["pages"] for s in steps) <= bound < POOL_PAGES
    # Negative control: the same steps held at their logical length (no eviction) break it.
    assert max(-(-s["logical_len"] // PAGE) for s in steps) > 4 * bound


def test_a_pool_just_above_the_bound_serves_it_with_prefix_caching_on(tiny_model, tmp_path):
    """Prefix caching is on (vLLM's default). A request compacted during its prompt keeps out
    of the prefix cache, so its first compaction is in place: copying on write would need
    the first point's pages (6) and the compacted ones (6) at once, 12 of these 9 usable
    pages, and the request would preempt itself at that point forever."""
    cfg = EvictionConfig(**SERVER)
    pool = -(-(cfg.cap + cfg.prefill_chunk) // PAGE) + 2  # the bound, vLLM's null page, 1 spare
    assert cfg.first_prefill_point // PAGE + -(-cfg.budget // PAGE) + 2 > pool - 1
    out = run_engine_job({"engine": _engine(tiny_model, SERVER, pool), "requests": [_request(LONG)]},
                         tmp_path / "small", timeout=300)
    assert len(out["results"][0]["token_ids"]) == SAMPLING["max_tokens"]
    assert "preempted" not in out["log"]


def test_the_oracle_holds_across_chunk_compactions(bounded, hf_model):
    alone = bounded["alone"]
    records = records_for(bounded["records"], alone["request_id"])
    report = compare(hf_model, LONG, alone["token_ids"], alone["logprobs"], records)
    assert report["max_abs_dlogprob"] <= TOLERANCE, report
    # Negative control: judged with only the compactions after the prompt (as if prefill had
    # kept everything), the same output must fail.
    late = [r for r in records if r["logical_len"] >= PROMPT_LEN]
    wrong = compare(hf_model, LONG, alone["token_ids"], alone["logprobs"], late)
    assert wrong["max_abs_dlogprob"] > 100 * TOLERANCE, wrong


def test_the_same_tokens_alone_and_under_load(bounded):
    alone, loaded = bounded["alone"], bounded["loaded"]
    assert loaded["token_ids"] == alone["token_ids"]
    assert max(abs(a - b) for a, b in zip(loaded["logprobs"], alone["logprobs"],
                                          strict=True)) <= TOLERANCE


def test_bounded_requests_are_admitted_only_where_their_peaks_fit_together(tiny_model, tmp_path):
    """Six requests whose bounds (7 pages each) add up to almost twice the pool arrive at once.
    The scheduler keeps each running request's growth up to its bound free, so a request is
    admitted only when its bound fits beside the others' whole bounds: never more than three
    run together, and none is ever preempted. vLLM alone admits a request whenever its bound
    fits in the free pages, which counts none of that growth: without the reservation four
    run together here (checked), and the last two assertions fail."""
    cfg = EvictionConfig(**SERVER)
    usable = POOL_PAGES - 1  # vLLM's null page
    prompts = [_tokens(300 + i, 500) for i in range(6)]
    peak = -(-cfg.peak_length(500 + SAMPLING["max_tokens"]) // PAGE)
    assert len(prompts) * peak > usable >= 3 * peak
    engine = {**_engine(tiny_model, SERVER), "max_num_batched_tokens": 2048}
    out = run_engine_job({"engine": engine, "requests": [_request(p) for p in prompts]},
                         tmp_path / "admission", page_trace_dir=tmp_path / "pages", timeout=300)
    assert all(len(r["token_ids"]) == SAMPLING["max_tokens"] for r in out["results"])
    assert "preempted" not in out["log"]
    steps: dict[int, list[dict]] = {}
    for line in read_page_trace(tmp_path / "pages"):
        steps.setdefault(line["step"], []).append(line)
    assert max(len(running) for running in steps.values()) == usable // peak
    assert all(len(running) * peak <= usable for running in steps.values())


def test_pyramidkv_hidden_pages_hold_across_chunk_compactions(tiny_model, hf_model, tmp_path):
    """pyramidkv compacted at every chunk point: its hidden entries (32, 64, 96 of 128 in
    layers 1-3) fill the first pages, which the CPU backend's attention skips, also for the
    prefill chunks that follow. HF with each layer's visible mask reproduces the logprobs,
    and fails with the layers' full held sets."""
    prompt = LONG[:1024]
    server = {**SERVER, "policy": "pyramidkv"}
    out = run_engine_job({"engine": _engine(tiny_model, server), "requests": [_request(prompt)]},
                         tmp_path / "pyramid", dump_dir=tmp_path / "dump", timeout=300)
    result = out["results"][0]
    records = records_for(read_dump(tmp_path / "dump"), result["request_id"])
    assert [len(layer[0]) for layer in records[0]["kept"]] == [128, 96, 64, 32]
    report = compare(hf_model, prompt, result["token_ids"], result["logprobs"], records)
    assert report["max_abs_dlogprob"] <= TOLERANCE, report
    # Negative control: every layer judged as seeing what layer 0 sees.
    wrong = [{**r, "kept": [r["kept"][0]] * len(r["kept"])} for r in records]
    report = compare(hf_model, prompt, result["token_ids"], result["logprobs"], wrong)
    assert report["max_abs_dlogprob"] > 100 * TOLERANCE, report
