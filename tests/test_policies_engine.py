"""Every policy through the real engine: HF reproduces its logprobs under its kept sets, and its
kept sets are the top scores of an independent plain-torch computation on HF's own Q/K/V."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_engine_job
from vllm_evict.core.dump import read_dump, records_for
from vllm_evict.core.oracle import compare, load_reference_model, reference_logprobs
from vllm_evict.core.policies import get_policy_class
from vllm_evict.core.policies.snapkv import SnapKVPolicy

pytestmark = pytest.mark.engine

# snapkv and pyramidkv pool their window scores here (kernel 5; the default is 1) so that the
# pooling stays covered end to end; their window is the default.
POOL_KERNEL = 5
SERVER = {"policy": "none", "budget": 64, "sink_tokens": 4, "window": 16, "slack": 16,
          "policy_args": {p: {"pool_kernel": POOL_KERNEL} for p in ("snapkv", "pyramidkv")}}
POLICIES = ["streaming", "h2o", "tova", "snapkv", "pyramidkv", "keydiff", "knorm", "random",
            "expected_attention"]
SHARED = {p for p in POLICIES if get_policy_class(p)().heads == "shared"}
UNIFORM = [p for p in POLICIES if p != "pyramidkv"]  # same visible count in every layer
PROMPT = [random.Random(21).randrange(10, 4000) for _ in range(300)]
# Run name -> (policy, prompt). The short prompt is under budget + slack, so h2o decodes 31
# steps into its first compaction while its first page is the others' cached page (prefix
# caching): those steps' queries are buffered and folded into its private scores.
RUNS = {p: (p, PROMPT) for p in POLICIES} | {"h2o_short_prompt": ("h2o", PROMPT[:50])}
STEPS = 120
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    sampling = {"max_tokens": STEPS, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    spec = {"engine": {"model": tiny_model, "max_model_len": 2048, "dtype": "float32",
                       "enforce_eager": True, "seed": 0, "block_size": 32,
                       "max_num_batched_tokens": 256, "additional_config": {"kv_eviction": SERVER}},
            "requests": [{"prompt_token_ids": prompt, "sampling": sampling,
                          "extra_args": {"kv_eviction": policy}}
                         for policy, prompt in RUNS.values()]}
    work = tmp_path_factory.mktemp("policies")
    out = run_engine_job(spec, work / "run", dump_dir=work / "dump")
    records = read_dump(work / "dump")
    return {name: (r, records_for(records, r["request_id"]))
            for name, r in zip(RUNS, out["results"], strict=True)}


@pytest.fixture(scope="module")
def hf(tiny_model):
    return load_reference_model(tiny_model)


@pytest.fixture(scope="module")
def captures(runs, hf):
    """Per policy: HF's keys, values, attention probabilities and queries before RoPE (the
    output of q_proj) under that policy's kept sets."""
    out = {}
    for name, (result, records) in runs.items():
        capture: dict = {}
        prerope: dict[int, torch.Tensor] = {}
        hooks = [layer.self_attn.q_proj.register_forward_hook(
            lambda _m, _a, q, i=i, into=prerope: into.__setitem__(i, q[0].detach()))
            for i, layer in enumerate(hf.model.layers)]
        try:
            reference_logprobs(hf, RUNS[name][1], result["token_ids"], records, capture)
        finally:
            for hook in hooks:
                hook.remove()
        for i, queries in prerope.items():
            capture[i]["prerope"] = queries.view(queries.shape[0], -1, hf.config.head_dim)
        capture["rotary"] = hf.model.rotary_emb
        out[name] = capture
    return out


@pytest.mark.parametrize("name", RUNS)
def test_hf_reproduces_the_logprobs(runs, hf, name):
    result, records = runs[name]
    assert len(records) >= 5
    report = compare(hf, RUNS[name][1], result["token_ids"], result["logprobs"], records)
    assert report["max_abs_dlogprob"] <= TOLERANCE and report["argmax_matches"] == STEPS, report


def test_score_policies_choose_different_tokens(runs):
    first_sets = {p: runs[p][1][-1]["kept"][1][0][:40] for p in UNIFORM}
    assert len({tuple(v) for v in first_sets.values()}) == len(UNIFORM), first_sets


def _expected_scores(policy: str, layer: dict, positions: torch.Tensor, computed: int,
                     kv_heads: int) -> torch.Tensor:
    """Independent scores of `positions` [kv_heads, n] at a compaction with `computed` tokens."""
    probs = layer["probs"]  # [q_heads, T, T]: rows are queries, HF eager, under the kept masks
    per_kv = probs.reshape(kv_heads, -1, *probs.shape[1:]).sum(1).double()  # [kv_heads, T, T]
    heads = torch.arange(kv_heads)[:, None]
    if policy == "streaming":
        return positions.double()
    if policy == "h2o":  # every query so far, per query that could see the key (the default)
        return per_kv[:, :computed].sum(1)[heads, positions] / (computed - positions).double()
    if policy == "tova":  # the latest query
        return per_kv[:, computed - 1][heads, positions]
    if policy == "snapkv":  # the last prompt queries, max-pooled over the prompt; then decode sums
        n, w, k = len(PROMPT), SnapKVPolicy.observation_window, POOL_KERNEL
        window = per_kv[:, n - w:n, :n].sum(1)
        pooled = F.max_pool1d(window[:, None], k, stride=1, padding=k // 2)[:, 0]
        pooled = torch.cat([pooled, torch.zeros(kv_heads, per_kv.shape[-1] - n, dtype=pooled.dtype)], 1)
        return (pooled + per_kv[:, n:computed].sum(1))[heads, positions]
    keys = layer["keys"].double()[heads, positions]  # [kv_heads, n, D]
    if policy == "keydiff":
        mean = keys.mean(1, keepdim=True)
        return 1 - F.cosine_similarity(keys, mean, dim=-1)
    if policy == "knorm":
        return -keys.norm(dim=-1)
    if policy == "expected_attention":  # kvpress's ExpectedAttentionPress, written out
        return _expected_attention_scores(layer, positions, computed, kv_heads)
    if policy == "random":
        g = torch.Generator().manual_seed(computed)
        return torch.rand((len(layer["all_layers"]), kv_heads, positions.shape[1]), generator=g)[
            layer["index"]].double()
    raise AssertionError(policy)


def _expected_attention_scores(layer: dict, positions: torch.Tensor, computed: int,
                               kv_heads: int) -> torch.Tensor:
    queries = layer["prerope"][4:computed].double()  # [n, q_heads, D]: all but the 4 first
    dim = queries.shape[-1]
    mean = queries.mean(0)
    centred = queries - mean
    cov = torch.einsum("nhi,nhj->hij", centred, centred) / queries.shape[0]
    cos, sin = layer["rotary"](queries.float(), torch.arange(computed, computed + 512)[None])
    half = dim // 2
    swap = torch.zeros(dim, dim, dtype=torch.float64)  # rotate_half as a matrix
    swap[half:, :half], swap[:half, half:] = torch.eye(half), -torch.eye(half)
    rot = cos[0].double().mean(0).diag() + sin[0].double().mean(0)[:, None] * swap
    mean, cov = mean @ rot.T, rot @ cov @ rot.T
    heads = torch.arange(kv_heads)[:, None]
    keys = layer["keys"].double()[heads, positions]  # [kv_heads, n, D]
    group = mean.shape[0] // kv_heads
    keys = keys.repeat_interleave(group, 0)
    logits = keys @ mean[:, :, None] / dim ** 0.5
    logits = logits[..., 0] + torch.einsum("hpi,hij,hpj->hp", keys, cov, keys) / (2 * dim)
    logits[positions.repeat_interleave(group, 0) < SERVER["sink_tokens"]] = float("-inf")
    probs = logits.softmax(-1).view(kv_heads, group, -1).mean(1)
    return probs * layer["values"].double()[heads, positions].norm(dim=-1)


def _kept_sets_follow(scores_policy: str, records: list[dict], capture: dict) -> bool:
    """Were the kept sets the protected tokens plus the top scores among the candidates?"""
    cfg = SERVER
    previous, previous_len = None, 0
    for rec in sorted(records, key=lambda r: r["logical_len"]):
        computed = rec["logical_len"]
        for li, kept_layer in enumerate(rec["kept"]):
            layer = {**capture[li], "index": li, "all_layers": rec["kept"],
                     "rotary": capture["rotary"]}
            kv_heads = len(kept_layer)
            new = list(range(previous_len, computed))
            cands = torch.tensor([(previous[li][h] if previous else []) + new for h in range(kv_heads)])
            scores = _expected_scores(scores_policy, layer, cands, computed, kv_heads)
            if scores_policy in SHARED:  # one set per layer, by the mean over its KV heads
                scores = scores.mean(0, keepdim=True).expand_as(scores)
            for h in range(kv_heads):
                kept = set(kept_layer[h])
                protected = (cands[h] < cfg["sink_tokens"]) | (cands[h] >= computed - cfg["window"])
                if not set(cands[h][protected].tolist()) <= kept:
                    return False
                free = ~protected
                is_kept = torch.tensor([p in kept for p in cands[h].tolist()])
                if (is_kept & free).any() and (~is_kept & free).any():
                    worst_kept = scores[h][is_kept & free].min()
                    best_dropped = scores[h][~is_kept & free].max()
                    if worst_kept < best_dropped - 1e-5 * max(1.0, float(best_dropped.abs())):
                        return False
        previous, previous_len = rec["kept"], computed
    return True


@pytest.mark.parametrize("name", [*UNIFORM, "h2o_short_prompt"])
def test_kept_sets_are_the_top_independent_scores(runs, captures, name):
    records = runs[name][1]
    if name == "h2o_short_prompt":  # its first compaction comes during decode, not at prefill
        assert min(r["logical_len"] for r in records) > len(RUNS[name][1])
    assert _kept_sets_follow(RUNS[name][0], records, captures[name])


def test_pyramidkv_layers_see_shrinking_budgets_of_the_best_snapkv_tokens(runs, captures):
    """At the end of prefill (79 held: budget 64 + 15 of the slack cycle) layer l's attention
    sees the highest SnapKV scores but budget - ramp(l): the ramp 64 -> 21 over 4 layers hides
    0, 14, 29, 43, in whole pages of 32: 0, 0, 32, 32, which the CPU backend skips (the HF
    oracle above checks the logprobs)."""
    first = min(runs["pyramidkv"][1], key=lambda r: r["logical_len"])
    assert first["logical_len"] == len(PROMPT)  # it waited for the end of prefill
    assert [[len(h) for h in layer] for layer in first["kept"]] == [[79] * 2, [79] * 2,
                                                                   [47] * 2, [47] * 2]
    assert _kept_sets_follow("snapkv", [first], captures["pyramidkv"])
    assert not _kept_sets_follow("h2o", [first], captures["pyramidkv"])


def test_the_oracle_fails_if_the_skipped_pages_were_seen(runs, hf):
    """Negative control for the skipped pages: HF told that the last layers saw what layer 1
    sees (a page more than the engine let them) must not reproduce pyramidkv's logprobs."""
    result, records = runs["pyramidkv"]
    wrong = [{**r, "kept": [*r["kept"][:2], r["kept"][1], r["kept"][1]]} for r in records]
    report = compare(hf, PROMPT, result["token_ids"], result["logprobs"], wrong)
    assert report["max_abs_dlogprob"] > 100 * TOLERANCE, report


@pytest.mark.parametrize("name, judged_as", [("h2o", "tova"), ("tova", "h2o"),
                                             ("snapkv", "h2o"), ("keydiff", "knorm"),
                                             ("expected_attention", "keydiff"),
                                             ("h2o_short_prompt", "tova")])
def test_the_score_check_fails_for_the_wrong_statistic(runs, captures, name, judged_as):
    """Negative control: the same kept sets judged by another policy's scores must fail."""
    assert not _kept_sets_follow(judged_as, runs[name][1], captures[name])
