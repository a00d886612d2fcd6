"""Head aggregation, h2o's accumulation rule, and the RoPE and query statistics behind expected
attention, each against an independent computation (vLLM's own rotary op for RoPE)."""

from __future__ import annotations

import pytest
import torch

from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.observation import QueryMoments
from vllm_evict.core.policies import SelectionInput, get_policy_class
from vllm_evict.core.rope import RopeTable

CFG = EvictionConfig(policy="h2o", budget=20, sink_tokens=2, window=4, slack=0)


def _input(scores: torch.Tensor, computed: int | None = None) -> SelectionInput:
    layers, heads, held = scores.shape
    positions = torch.arange(held).expand(layers, heads, -1).clone()
    return SelectionInput("r", positions, computed or held, 20, CFG, scores=scores)


def test_shared_heads_keep_one_set_per_layer_by_the_mean_score():
    scores = torch.rand(3, 4, 60, generator=torch.Generator().manual_seed(0))
    shared = get_policy_class("h2o")(heads="shared", accumulation="sum").select(_input(scores))
    per_head = get_policy_class("h2o")(heads="per_head", accumulation="sum").select(_input(scores))
    assert (shared == shared[:, :1]).all() and not (per_head == per_head[:, :1]).all()
    mean = scores.mean(1)  # independent: the protected tokens, then the top mean scores
    for layer in range(3):
        free = mean[layer, 2:56]
        expected = sorted([0, 1, *range(56, 60), *(free.topk(14).indices + 2).tolist()])
        assert shared[layer, 0].tolist() == expected


def test_heads_must_be_a_known_mode():
    with pytest.raises(ValueError, match="heads must be one of per_head, shared"):
        EvictionConfig(policy="h2o", policy_args={"tova": {"heads": "group"}})


def test_h2o_mean_divides_by_the_queries_that_saw_each_key():
    scores = torch.ones(1, 1, 50)  # every key got the same total: the mean favours the newest
    inp = _input(scores, computed=50)
    mean = get_policy_class("h2o")().score(inp)  # the default, kvpress's rule
    assert torch.allclose(mean[0, 0], 1 / (50 - torch.arange(50.0)))
    assert torch.equal(get_policy_class("h2o")(accumulation="sum").score(inp), scores)  # H2O's
    with pytest.raises(ValueError, match="accumulation"):
        get_policy_class("h2o")(accumulation="max")


def _vllm_rope(head_dim=64, rotary_dim=64, max_pos=4096):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return get_rope(head_dim, max_position=max_pos, is_neox_style=True,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                         "partial_rotary_factor": rotary_dim / head_dim})


def test_unrotate_inverts_vllms_rotary_op():
    rope = _vllm_rope()
    table = RopeTable(rope.cos_sin_cache.float(), neox=rope.is_neox_style)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(7, 3 * 64, generator=g)
    positions = torch.tensor([0, 1, 5, 100, 1000, 2047, 4094])
    rotated, _ = rope.forward_native(positions, query.clone(), torch.zeros(7, 64))
    back = table.unrotate(rotated.view(7, 3, 64), positions)
    assert torch.allclose(back, query.view(7, 3, 64), atol=1e-4)
    wrong = table.unrotate(rotated.view(7, 3, 64), positions + 1)  # must fail the check
    assert not torch.allclose(wrong, query.view(7, 3, 64), atol=1e-2)


def test_mean_rotation_is_the_average_of_vllms_rotations():
    rope = _vllm_rope()
    table = RopeTable(rope.cos_sin_cache.float())
    q = torch.randn(64, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(300, 300 + 128)
    rotated, _ = rope.forward_native(positions, q.expand(128, 64).clone(), torch.zeros(128, 64))
    assert torch.allclose(table.mean_rotation(300, 128, 64) @ q, rotated.mean(0), atol=1e-4)
    # past the table, the window shifts back to the table's end instead of failing
    assert torch.equal(table.mean_rotation(4000, 512, 64), table.mean_rotation(3584, 512, 64))


def test_query_moments_are_the_mean_and_population_covariance():
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(40, 2, 8, generator=g) * 3 + 5  # large means, as real queries have
    moments = QueryMoments()
    for chunk in queries.split([13, 1, 26]):  # chunked prefill, then one decode query, ...
        moments.add(0, 1, chunk)
    mean, cov = moments.mean_and_covariance()
    for head in range(2):
        x = queries[:, head].double()
        assert torch.allclose(mean[0, head].double(), x.mean(0), atol=1e-5)
        assert torch.allclose(cov[0, head].double(), torch.cov(x.T, correction=0), atol=1e-4)
    with pytest.raises(ValueError, match="no queries"):
        QueryMoments().mean_and_covariance()


def test_decode_query_moments_batched_equal_one_by_one():
    """Three expected-attention requests decoding in one step, over two layers: the batched
    path (one un-rotation per layer, folded after the forward) adds exactly what the
    one-request path adds."""
    from vllm_evict.core import observation as stats

    theta = 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    angles = torch.arange(512)[:, None] * theta[None]
    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], dim=-1))
    g = torch.Generator().manual_seed(4)
    queries = [torch.randn(3, 4, 16, generator=g) for _ in range(2)]  # per layer [rows, q_heads, D]
    positions = [40, 7, 300]

    def run(batched: bool) -> list[stats.QueryMoments]:
        moments = [stats.QueryMoments() for _ in positions]
        obs = [stats.Observation(row, stats.Observe.QUERY_MOMENTS, first_position=p, moments=m)
               for row, (p, m) in enumerate(zip(positions, moments, strict=True))]
        caches = [torch.empty(1), torch.empty(1)]
        plan = stats.StepPlan(obs, [torch.zeros(4, 8, 2)] * 2,
                              {c.data_ptr(): i for i, c in enumerate(caches)}, rope=rope,
                              host_layout=([0, 1, 2, 3], [41, 8, 301]))
        if not batched:
            plan.derived.update(moments=None, decode=None, each=obs)
        for layer, cache in enumerate(caches):
            stats.observe_layer(plan, cache, torch.zeros(4, 2, 8, 16), torch.zeros(4, 2, 8, 16),
                                queries[layer], torch.zeros(3, 4, 16), torch.tensor([0, 1, 2, 3]),
                                torch.tensor([41, 8, 301]), torch.zeros(3, 4, dtype=torch.int32),
                                0.25)
        assert (plan.derived["moments"] is not None) == batched
        stats.finish_step(plan)
        return moments

    for a, b in zip(run(batched=True), run(batched=False), strict=True):
        assert a.total is None and len(a.pending) == 1  # deferred until read
        a.fold()
        assert torch.allclose(a.total, b.total) and torch.allclose(a.outer, b.outer)
        assert torch.equal(a.count, b.count) and a.count.tolist() == [1.0, 1.0]
    first, second, _ = run(batched=True)
    assert not torch.allclose(first.mean_and_covariance()[0], second.mean_and_covariance()[0])  # rows apart


def test_deferred_decode_queries_fold_to_the_moments_added_one_by_one():
    """Decode queries buffered rotated and folded in batches (at the limit and when read) give
    the moments of un-rotating and adding each one in its own step; a wrong position for one
    of them must not."""
    from vllm_evict.core import observation as stats

    theta = 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    angles = torch.arange(512)[:, None] * theta[None]
    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], dim=-1))
    g = torch.Generator().manual_seed(5)
    steps = stats.PENDING_QUERIES_LIMIT + 7  # one fold at the limit, one when read
    queries = torch.randn(steps, 3, 4, 16, generator=g) * 2 + 1  # [steps, layers, q_heads, D]
    positions = list(range(100, 100 + steps))

    def deferred(shift_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
        moments = stats.QueryMoments()
        for step, (q, p) in enumerate(zip(queries, positions, strict=True)):
            moments.defer(q, p + (1 if shift_one and step == 3 else 0), rope)
            if step == stats.PENDING_QUERIES_LIMIT - 1:
                assert moments.pending == [] and moments.count.tolist() == [float(step + 1)] * 3
        return moments.mean_and_covariance()

    one_by_one = stats.QueryMoments()
    for q, p in zip(queries, positions, strict=True):
        for layer in range(3):
            one_by_one.add(layer, 3, rope.unrotate(q[layer][None], torch.tensor([p])))
    want_mean, want_cov = one_by_one.mean_and_covariance()
    mean, cov = deferred(shift_one=False)
    assert torch.allclose(mean, want_mean, atol=1e-5) and torch.allclose(cov, want_cov, atol=1e-4)
    wrong_mean, _ = deferred(shift_one=True)
    assert not torch.allclose(wrong_mean, want_mean, atol=1e-5)
