"""The offline engine, fp32 and eager, against Hugging Face and against vanilla vLLM.

One engine with the plugin and one with every plugin disabled (VLLM_PLUGINS=""), each run once
over the same requests. Eviction requests must match HF eager attention with a 4-D mask of the
kept positions; requests that do not evict must give vanilla's tokens.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import run_engine_job
from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.dump import read_dump, records_for
from vllm_evict.core.oracle import compare, load_reference_model

pytestmark = pytest.mark.engine

SERVER = {"policy": "none", "budget": 64, "sink_tokens": 4, "window": 16, "slack": 16}
TOLERANCE = 1e-4
BF16_TOLERANCE = 0.05  # measured: 0.0078 (one bf16 step of a logprob)
DECODE_STEPS = 220


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


def _greedy(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}


# name -> (prompt, sampling, vllm_xargs)
REQUESTS = {
    "streaming": (_prompt(1, 300), _greedy(DECODE_STEPS), {"kv_eviction": "streaming"}),
    # 700 tokens in 256-token chunks, compacted once the prompt is in.
    "streaming_chunked": (_prompt(2, 700), _greedy(DECODE_STEPS),
                          {"kv_eviction": "streaming", "kv_budget": 100}),
    "opt_out": (_prompt(3, 300), _greedy(60), {"kv_eviction": "none"}),
    "under_budget": (_prompt(4, 40), _greedy(30), {"kv_eviction": "streaming"}),
    "server_default": (_prompt(5, 200), _greedy(40), None),
    # cap = budget + slack = 80. The last output token is never computed, so prompt +
    # max_tokens = cap + 2 never passes the cap (not flagged, vanilla behaviour) and cap + 3
    # is compacted exactly once, at 81 computed tokens.
    "cap_plus_2": (_prompt(6, 42), _greedy(40), {"kv_eviction": "streaming"}),
    "cap_plus_3": (_prompt(7, 43), _greedy(40), {"kv_eviction": "streaming"}),
}


def _engine(model: str, plugin: bool) -> dict:
    engine = {"model": model, "max_model_len": 2048, "dtype": "float32", "enforce_eager": True,
              "seed": 0, "block_size": 32, "max_num_batched_tokens": 256}
    if plugin:
        engine["additional_config"] = {"kv_eviction": SERVER}
    return engine


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    names = list(REQUESTS)
    plugin_spec = {"engine": _engine(tiny_model, True), "requests": [
        {"prompt_token_ids": p, "sampling": s, "extra_args": x} for p, s, x in REQUESTS.values()]}
    vanilla_spec = {"engine": _engine(tiny_model, False), "requests": [
        {"prompt_token_ids": p, "sampling": s, "extra_args": None} for p, s, _ in REQUESTS.values()]}
    work = tmp_path_factory.mktemp("offline")
    dump_dir = work / "dump"
    evict = run_engine_job(plugin_spec, work / "evict", dump_dir=dump_dir)
    vanilla = run_engine_job(vanilla_spec, work / "vanilla", vanilla=True)
    records = read_dump(dump_dir) if dump_dir.exists() else []
    return {
        "evict": dict(zip(names, evict["results"], strict=True)),
        "vanilla": dict(zip(names, vanilla["results"], strict=True)),
        "records": {n: records_for(records, r["request_id"])
                    for n, r in zip(names, evict["results"], strict=True)},
        "evict_log": evict["log"],
    }


@pytest.fixture(scope="module")
def bf16_run(tiny_model, tmp_path_factory):
    """The streaming request again, in bf16 (the model's saved dtype), as deployments run."""
    prompt, sampling, xargs = REQUESTS["streaming"]
    engine = {**_engine(tiny_model, True), "dtype": "bfloat16"}
    work = tmp_path_factory.mktemp("offline_bf16")
    out = run_engine_job({"engine": engine, "requests": [
        {"prompt_token_ids": prompt, "sampling": sampling, "extra_args": xargs}]},
        work / "evict", dump_dir=work / "dump")
    result = out["results"][0]
    return prompt, result, records_for(read_dump(work / "dump"), result["request_id"])


@pytest.fixture(scope="module")
def mapped_layout_run(tiny_model, tmp_path_factory):
    """bf16 with the cache addressed through the probed index map (the code path of AMX
    CPUs, whose packed layout has no strided view), for policies reading keys and attention."""
    import os

    work = tmp_path_factory.mktemp("offline_mapped")
    reqs = [(_prompt(20 + i, 300), _greedy(120), {"kv_eviction": p})
            for i, p in enumerate(["h2o", "keydiff", "snapkv"])]
    engine = {**_engine(tiny_model, True), "dtype": "bfloat16"}
    old = os.environ.get("VLLM_EVICT_CPU_LAYOUT")
    os.environ["VLLM_EVICT_CPU_LAYOUT"] = "mapped"
    try:
        out = run_engine_job({"engine": engine, "requests": [
            {"prompt_token_ids": p, "sampling": s, "extra_args": x} for p, s, x in reqs]},
            work / "evict", dump_dir=work / "dump")
    finally:
        if old is None:
            os.environ.pop("VLLM_EVICT_CPU_LAYOUT")
        else:
            os.environ["VLLM_EVICT_CPU_LAYOUT"] = old
    return reqs, out, read_dump(work / "dump")


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return load_reference_model(tiny_model)


@pytest.mark.parametrize("name", ["streaming", "streaming_chunked"])
def test_eviction_matches_hf_with_kept_mask(runs, hf_model, name):
    prompt = REQUESTS[name][0]
    out, records = runs["evict"][name], runs["records"][name]
    assert len(records) >= 10, "expected many compactions over 220 decode steps"
    report = compare(hf_model, prompt, out["token_ids"], out["logprobs"], records)
    assert report["max_abs_dlogprob"] <= TOLERANCE, report
    assert report["argmax_matches"] == DECODE_STEPS, report


def test_bf16_eviction_matches_hf_within_bf16_rounding(bf16_run, hf_model):
    """bf16 activations round to 8 significant bits, so vLLM and the fp32 HF oracle (same
    bf16 weights) differ by rounding noise, far below what a wrong kept set gives."""
    prompt, out, records = bf16_run
    assert len(records) >= 10
    report = compare(hf_model, prompt, out["token_ids"], out["logprobs"], records)
    assert report["max_abs_dlogprob"] <= BF16_TOLERANCE, report
    assert report["argmax_matches"] >= 0.9 * DECODE_STEPS, report  # near-ties flip in bf16
    ignored = compare(hf_model, prompt, out["token_ids"], out["logprobs"], [])  # negative control
    assert ignored["max_abs_dlogprob"] > 5 * BF16_TOLERANCE, ignored
    print(f"\nbf16 oracle: {report}; eviction ignored: {ignored}")


def test_mapped_layout_path_matches_hf(mapped_layout_run, hf_model):
    reqs, out, records = mapped_layout_run
    assert "KV layout probed with vLLM's cache-write op: MappedPagedView" in out["log"]
    for (prompt, _, xargs), result in zip(reqs, out["results"], strict=True):
        recs = records_for(records, result["request_id"])
        assert len(recs) >= 5
        report = compare(hf_model, prompt, result["token_ids"], result["logprobs"], recs)
        assert report["max_abs_dlogprob"] <= BF16_TOLERANCE, (xargs, report)


def test_no_compaction_before_the_prompt_is_computed(runs):
    """The 700-token prompt runs in 256-token chunks; compaction waits for its end, so the
    output does not depend on how a busy server chunks it."""
    prompt_len = len(REQUESTS["streaming_chunked"][0])
    lengths = [r["logical_len"] for r in runs["records"]["streaming_chunked"]]
    assert min(lengths) == prompt_len, lengths


def test_oracle_rejects_ignoring_eviction(runs, hf_model):
    """Negative control: the same run judged as if nothing was evicted must fail."""
    prompt = REQUESTS["streaming"][0]
    out = runs["evict"]["streaming"]
    report = compare(hf_model, prompt, out["token_ids"], out["logprobs"], [])
    assert report["max_abs_dlogprob"] > 100 * TOLERANCE, report


def test_oracle_rejects_a_wrong_kept_set(runs, hf_model):
    """Negative control: swap one kept position for an evicted one in a single compaction."""
    prompt = REQUESTS["streaming"][0]
    out = runs["evict"]["streaming"]
    records = [dict(r) for r in runs["records"]["streaming"]]
    first = records[0]
    kept = [[list(head) for head in layer] for layer in first["kept"]]
    evicted = sorted(set(range(first["logical_len"])) - set(kept[0][0]))
    kept[0][0][10] = evicted[len(evicted) // 2]
    kept[0][0].sort()
    records[0] = {**first, "kept": kept}
    report = compare(hf_model, prompt, out["token_ids"], out["logprobs"], records)
    assert report["max_abs_dlogprob"] > 10 * TOLERANCE, report


@pytest.mark.parametrize("name", ["opt_out", "under_budget", "server_default", "cap_plus_2"])
def test_requests_that_do_not_evict_match_vanilla(runs, name):
    ours, vanilla = runs["evict"][name], runs["vanilla"][name]
    assert ours["token_ids"] == vanilla["token_ids"]
    assert max(abs(a - b) for a, b in zip(ours["logprobs"], vanilla["logprobs"], strict=True)) <= TOLERANCE
    assert runs["records"][name] == []


def test_eviction_changes_the_output(runs):
    """Sanity: eviction really happened (random weights make any change visible)."""
    assert runs["evict"]["streaming"]["token_ids"] != runs["vanilla"]["streaming"]["token_ids"]


def test_dump_records_follow_the_length_formula(runs):
    for name, overrides in (("streaming", {}), ("streaming_chunked", {"budget": 100})):
        cfg = EvictionConfig(**{**SERVER, "policy": "streaming", **overrides})
        for rec in runs["records"][name]:
            assert set(rec) == {"request_id", "step", "logical_len", "kept"}
            kept = rec["kept"]
            assert len(kept) == 4 and all(len(layer) == 2 for layer in kept)  # layers x KV heads
            length = cfg.physical_length(rec["logical_len"])
            for layer in kept:
                for head in layer:
                    assert len(head) == length
                    assert head == sorted(set(head))
                    assert head[: cfg.sink_tokens] == list(range(cfg.sink_tokens))
                    assert head[-1] == rec["logical_len"] - 1  # the newest token is kept


def test_finished_requests_are_logged_with_their_savings(runs):
    lines = [ln for ln in runs["evict_log"].splitlines() if "vllm-evict: request" in ln]
    # Only the requests flagged may_evict are logged: the two long ones and cap_plus_3.
    assert len(lines) == 3, lines
    assert all("evicted_tokens=" in ln and "pages_freed=" in ln for ln in lines)
    # vLLM suffixes the ids it logs: "6" is logged as "6-a8d03262".
    flagged = {ln.split("vllm-evict: request ")[1].split(" done")[0].split("-")[0]
               for ln in lines}
    assert flagged == {runs["evict"][n]["request_id"]
                       for n in ("streaming", "streaming_chunked", "cap_plus_3")}


def test_may_evict_is_exact_at_the_boundary(runs):
    """cap + 2 is never compacted (so it keeps the prefix cache); cap + 3 is, once."""
    assert runs["records"]["cap_plus_2"] == []
    assert [r["logical_len"] for r in runs["records"]["cap_plus_3"]] == [81]
    # The compaction at 81 comes before the last forward: only the last token's distribution
    # changes (everything before it is vanilla's, to the bit).
    ours, vanilla = runs["evict"]["cap_plus_3"], runs["vanilla"]["cap_plus_3"]
    assert ours["token_ids"][:-1] == vanilla["token_ids"][:-1]
    assert max(abs(a - b) for a, b in zip(ours["logprobs"][:-1], vanilla["logprobs"][:-1],
                                          strict=True)) <= TOLERANCE
    assert abs(ours["logprobs"][-1] - vanilla["logprobs"][-1]) > TOLERANCE
