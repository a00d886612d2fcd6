"""EvictionConfig: validation messages, per-request overrides, and the length formula."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_evict.core.config import EvictionConfig, EvictionConfigError


@pytest.mark.parametrize("values, needle", [
    ({"policy": "lru"}, "kv_eviction.policy: unknown policy 'lru'; allowed: none, "),
    ({"budget": 0}, "kv_eviction.budget: must be an integer > 0"),
    ({"budget": -3}, "kv_eviction.budget: must be an integer > 0; got -3"),
    ({"budget": 12.5}, "kv_eviction.budget: must be an integer; got 12.5 (float)"),
    ({"budget": "2048"}, "kv_eviction.budget: must be an integer; got '2048' (str)"),
    ({"budget": True}, "kv_eviction.budget: must be an integer; got True (bool)"),
    ({"budget": 36}, "budget must be > sink_tokens + window = 4 + 32 = 36; got budget=36"),
    ({"slack": -1}, "kv_eviction.slack: must be an integer >= 0"),
    ({"sinks": 4}, "kv_eviction.sinks: unknown field; allowed fields: policy, budget"),
])
def test_bad_values_name_the_field_and_what_is_allowed(values, needle):
    with pytest.raises(EvictionConfigError) as err:
        EvictionConfig.parse(values)
    assert needle in str(err.value)


def test_defaults_and_additional_config_forms():
    assert EvictionConfig.from_additional_config(None) is None
    assert EvictionConfig.from_additional_config({"other": 1}) is None
    assert EvictionConfig.from_additional_config({"kv_eviction": {}}) == EvictionConfig()
    assert EvictionConfig.from_additional_config({"kv_eviction": "streaming"}).policy == "streaming"
    with pytest.raises(EvictionConfigError, match="expected a mapping"):
        EvictionConfig.from_additional_config({"kv_eviction": 5})


def test_request_overrides():
    server = EvictionConfig(policy="streaming", budget=512)
    assert server.for_request(None) is server
    assert server.for_request({"temperature_hint": 1}) is server  # not ours: ignored
    assert server.for_request({"kv_budget": 256}).budget == 256
    assert server.for_request({"kv_eviction": "none"}).evicts is False
    with pytest.raises(EvictionConfigError, match=r"vllm_xargs.kv_budget: must be an integer"):
        server.for_request({"kv_budget": "256"})
    with pytest.raises(EvictionConfigError, match=r"vllm_xargs.kv_eviction: unknown policy"):
        server.for_request({"kv_eviction": "nope"})
    with pytest.raises(EvictionConfigError, match="per-request eviction keys are"):
        server.for_request({"kv_slack": 3})


def test_physical_length_examples():
    cfg = EvictionConfig(policy="streaming", budget=100, slack=10, window=8)
    assert [cfg.physical_length(c) for c in (0, 50, 110, 111, 112, 121, 122)] == \
        [0, 50, 110, 100, 101, 110, 100]
    assert EvictionConfig(budget=100, slack=10, window=8).physical_length(5000) == 5000  # none
    assert cfg.physical_length(300, num_prompt_tokens=400) == 300  # mid-prompt: nothing yet
    assert cfg.physical_length(400, num_prompt_tokens=400) == 100 + (400 - 111) % 11


@given(budget=st.integers(40, 300), slack=st.integers(0, 64), prompt=st.integers(1, 2000),
       steps=st.lists(st.integers(1, 300), min_size=1, max_size=40))
def test_physical_length_never_grows_faster_than_tokens(budget, slack, prompt, steps):
    """The property compaction relies on: the next boundary's length is reachable by compacting
    what is held (old length + new tokens), it stays within budget + slack once evicting, and
    it equals the logical length until then (and until the prompt is computed)."""
    cfg = EvictionConfig(policy="streaming", budget=budget, slack=slack)
    c = 0
    for n in steps:
        held = cfg.physical_length(c, prompt) + n
        c += n
        p = cfg.physical_length(c, prompt)
        assert p <= held
        assert p == c if (c <= cfg.cap or c < prompt) else budget <= p <= cfg.cap


@pytest.mark.parametrize("budget, slack", [(40, 0), (40, 1), (40, 7)])
def test_may_evict_is_exactly_whether_some_step_compacts(budget, slack):
    """Brute force over the step boundaries a request reaches: c computed tokens, from the
    prompt up to prompt + max_tokens - 2 (the last output token is sampled, never computed)."""
    cfg = EvictionConfig(policy="streaming", budget=budget, sink_tokens=4, window=8, slack=slack)
    cap = budget + slack
    for prompt in range(1, cap + 6):
        for max_tokens in range(1, cap + 8 - prompt if prompt < cap + 6 else 3):
            compacts = any(cfg.physical_length(c, prompt) < c
                           for c in range(prompt, prompt + max_tokens - 1))
            assert cfg.may_evict(prompt, max_tokens) == compacts, (prompt, max_tokens)
    assert not cfg.may_evict(cap - 3, 5) and cfg.may_evict(cap - 3, 6)  # cap + 2 / cap + 3


def test_policy_args_are_validated_and_reach_the_policy():
    cfg = EvictionConfig(policy="snapkv", budget=100,
                         policy_args={"snapkv": {"observation_window": 16, "pool_kernel": 3},
                                      "random": {"seed": 7}})
    policy = cfg.build_policy()
    assert (policy.observation_window, policy.pool_kernel) == (16, 3)
    assert cfg.for_request({"kv_eviction": "random"}).build_policy().seed == 7
    assert cfg.for_request({"kv_eviction": "h2o"}).build_policy() is not None  # no args: defaults
    parsed = EvictionConfig.parse({"policy": "pyramidkv", "policy_args": '{"pyramidkv": {"beta": 4}}'})
    assert parsed.build_policy().beta == 4
    for bad, needle in [
        ({"snapkv": {"window": 3}}, "snapkv: unknown parameter 'window'"),
        ({"snapkv": {"pool_kernel": "7"}}, "snapkv.pool_kernel: must be int"),
        ({"snapkv": {"pool_kernel": True}}, "snapkv.pool_kernel: must be int"),
        ({"lru": {}}, "unknown policy 'lru'"),
        ({"h2o": {"beta": 1}}, "h2o: unknown parameter 'beta'; h2o has accumulation, heads"),
        ({"tova": {"heads": "group"}}, "tova: heads must be one of per_head, shared"),
        ("{not json", "must be JSON"),
    ]:
        with pytest.raises(EvictionConfigError, match="kv_eviction.policy_args") as err:
            EvictionConfig.parse({"policy": "snapkv", "policy_args": bad})
        assert needle in str(err.value), str(err.value)


def test_compacts_within_names_exactly_the_steps_before_a_compaction():
    """Brute force: walk a request boundary by boundary (one token a step after a 50-token
    prompt, or drafts of 3) and compare with where compactions really happen."""
    from vllm_evict.core.state import RequestEvictionState

    cfg = EvictionConfig(policy="tova", budget=40, sink_tokens=4, window=8, slack=7)
    for step in (1, 4):
        state = RequestEvictionState(cfg)
        predicted, actual = [], []
        c = 50
        while c < 200:
            predicted.append(state.compacts_within(c, step, 50))
            nxt = c + step
            target = cfg.physical_length(nxt, 50)
            actual.append(nxt - state.evicted > target)
            if actual[-1]:
                state.evicted = nxt - target
            c = nxt
        assert predicted == actual and any(actual) and not all(actual)


# ---------------------------------------------------------------------- prefill eviction


def _prefill_boundaries(cfg: EvictionConfig, prompt: int, chunk_sizes: list[int], steps: int):
    """Step boundaries of a request whose prefill is chunked as a scheduler might (sizes drawn
    by the test) but never past a compaction point, then `steps` decode steps."""
    c, out, sizes = 0, [], iter(chunk_sizes * (prompt + 1))
    while c < prompt:
        n = min(next(sizes), prompt - c)
        stop = cfg.prefill_stop(c, prompt)
        if stop is not None:
            assert stop > c
            n = min(n, stop - c)
        c += n
        out.append(c)
    out += list(range(prompt + 1, prompt + 1 + steps))
    return out


def test_prefill_eviction_examples():
    cfg = EvictionConfig(policy="streaming", budget=100, slack=10, window=8,
                         prefill_eviction=True, prefill_chunk=64)
    assert cfg.first_prefill_point == 128  # the first multiple of 64 past the cap (110)
    assert [cfg.prefill_stop(c, 1000) for c in (0, 127, 128, 129, 959, 960)] == \
        [128, 128, 192, 192, 960, None]
    assert cfg.physical_length(120, 1000) == 120  # past the cap, before the first point
    assert [cfg.physical_length(c, 1000) for c in (128, 150, 192, 960, 999)] == \
        [100, 122, 100, 100, 139]
    # The prompt's end holds 100 + (1000 - 960) = 140 > cap: compacted there to the budget.
    assert cfg.physical_length(1000, 1000) == 100
    assert cfg.prefill_segment(500, 1000) == (448, 512)
    assert cfg.prefill_segment(980, 1000) == (960, 1000)
    assert cfg.prefill_segment(50, 1000) == (0, 128)
    assert cfg.may_evict(200, 1)  # compacted during prefill although it decodes nothing
    assert not EvictionConfig(policy="streaming", budget=100, slack=10, window=8).may_evict(200, 1)
    assert cfg.bounded_length is None  # requests may opt out
    assert cfg.model_copy(update={"request_override": "deny"}).bounded_length == 110 + 64


@given(budget=st.integers(41, 300), slack=st.integers(0, 40), chunk=st.integers(1, 200),
       prompt=st.integers(1, 2000), sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5),
       steps=st.integers(0, 200))
def test_prefill_eviction_bounds_the_peak_and_never_grows_faster_than_tokens(
        budget, slack, chunk, prompt, sizes, steps):
    cfg = EvictionConfig(policy="streaming", budget=budget, slack=slack, window=8,
                         prefill_eviction=True, prefill_chunk=chunk)
    held, previous = 0, 0
    for c in _prefill_boundaries(cfg, prompt, sizes, steps):
        grown = held + (c - previous)  # what the request holds before this boundary compacts
        assert grown <= cfg.cap + chunk  # the peak bound, for any prompt length
        physical = cfg.physical_length(c, prompt)
        assert physical <= grown
        assert physical >= min(c, cfg.budget)
        held, previous = physical, c
    assert cfg.peak_length(prompt + steps) <= cfg.cap + chunk


@given(budget=st.integers(41, 300), slack=st.integers(0, 40), chunk=st.integers(1, 200),
       prompt=st.integers(1, 2000),
       sizes_a=st.lists(st.integers(1, 700), min_size=1, max_size=4),
       sizes_b=st.lists(st.integers(1, 700), min_size=1, max_size=4))
def test_prefill_compaction_points_do_not_depend_on_chunking(
        budget, slack, chunk, prompt, sizes_a, sizes_b):
    """Two schedulers that chunk differently compact at the same logical lengths to the same
    physical lengths: the kept sets cannot depend on batching."""
    cfg = EvictionConfig(policy="streaming", budget=budget, slack=slack, window=8,
                         prefill_eviction=True, prefill_chunk=chunk)

    def compactions(sizes):
        out, held, previous = [], 0, 0
        for c in _prefill_boundaries(cfg, prompt, sizes, 50):
            physical = cfg.physical_length(c, prompt)
            if physical < held + (c - previous):
                out.append((c, physical))
            held, previous = physical, c
        return out

    assert compactions(sizes_a) == compactions(sizes_b)


def test_prefill_eviction_keeps_requests_compacted_in_their_prompt_out_of_the_prefix_cache():
    cfg = EvictionConfig(policy="tova", budget=100, slack=10, window=8, prefill_eviction=True,
                         prefill_chunk=64)
    assert cfg.first_prefill_point == 128
    assert not cfg.shares_pages(129) and cfg.prefix_hit_limit(1000) == 0
    assert cfg.shares_pages(128) and cfg.prefix_hit_limit(128) == 127  # compacted after it
    assert cfg.model_copy(update={"policy": "snapkv"}).prefix_hit_limit(128) == 128 - 32  # its window
    assert cfg.model_copy(update={"policy": "h2o"}).prefix_hit_limit(128) == 0
    assert cfg.model_copy(update={"prefill_eviction": False}).prefix_hit_limit(1000) == 999
