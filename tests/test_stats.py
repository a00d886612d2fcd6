"""The CPU statistics path (observe_layer) on a synthetic paged cache: query blocking must not
change any statistic, and the masked recompute must equal attention over the visible entries."""

from __future__ import annotations

import pytest
import torch

from vllm_evict.core import observation as stats
from vllm_evict.kernels.paged import gather_paged
from vllm_evict.kernels.scoring import attention_probs_reference

PAGE, HEADS, GROUP, DIM, BLOCKS = 8, 2, 2, 16, 20


def _setup(seed: int, seq: int, n: int):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(BLOCKS, HEADS, PAGE, DIM, generator=g)
    value = torch.randn(BLOCKS, HEADS, PAGE, DIM, generator=g)
    pages = torch.randperm(BLOCKS, generator=g)[: -(-seq // PAGE)].to(torch.int32)
    table = torch.zeros(1, BLOCKS, dtype=torch.int32)
    table[0, : len(pages)] = pages
    query = torch.randn(n, HEADS * GROUP, DIM, generator=g)
    return key, value, table, query


def _observe(ob, seq, n, key, value, table, query, block):
    scores = torch.full((BLOCKS, PAGE, HEADS), 0.5)
    output = torch.zeros(n, HEADS * GROUP, DIM)
    cache = torch.empty(1)
    plan = stats.StepPlan([ob], [scores], {cache.data_ptr(): 0})
    old, stats.QUERY_BLOCK = stats.QUERY_BLOCK, block
    try:
        stats.observe_layer(plan, cache, key, value, query, output, torch.tensor([0, n]),
                            torch.tensor([seq]), table, 0.25)
    finally:
        stats.QUERY_BLOCK = old
    return scores, output


@pytest.mark.parametrize("kind, extra", [
    (stats.Observe.ACCUMULATE, {}),
    (stats.Observe.LATEST, {}),
    (stats.Observe.WINDOW, {"window_from": 9, "window_starts": True, "window_ends": True,
                            "pool_kernel": 5}),
])
def test_query_blocks_do_not_change_statistics(kind, extra):
    seq, n = 61, 40
    key, value, table, query = _setup(0, seq, n)
    ob = stats.Observation(0, kind, **extra)
    whole, _ = _observe(ob, seq, n, key, value, table, query, block=1000)
    blocked, _ = _observe(ob, seq, n, key, value, table, query, block=7)
    assert torch.allclose(whole, blocked, atol=1e-6)
    assert not torch.equal(whole, torch.full_like(whole, 0.5))  # something was written


def test_masked_recompute_is_attention_over_visible_entries():
    seq, n = 30, 1
    key, value, table, query = _setup(1, seq, n)
    hidden = torch.zeros(HEADS, 20, dtype=torch.bool)
    hidden[0, 3:9] = True
    hidden[1, 10:12] = True
    ob = stats.Observation(0, stats.Observe.ACCUMULATE, visible=[~hidden])
    _, output = _observe(ob, seq, n, key, value, table, query, block=256)
    keys = gather_paged(key, table[0, :4].long(), seq)
    values = gather_paged(value, table[0, :4].long(), seq)
    want = torch.zeros(n, HEADS * GROUP, DIM)
    for q_head in range(HEADS * GROUP):
        h = q_head // GROUP
        visible = torch.ones(seq, dtype=torch.bool)
        visible[:20] = ~hidden[h]
        logits = (query[0, q_head] @ keys[h, visible].T) * 0.25
        want[0, q_head] = torch.softmax(logits, -1) @ values[h, visible]
    assert torch.allclose(output, want, atol=1e-5)
    probs = attention_probs_reference(query, keys, 0.25)
    assert not torch.allclose(output, torch.einsum("nhgs,hsd->nhgd", probs, values).reshape(
        n, -1, DIM), atol=1e-3)  # the mask mattered


def test_batched_decode_equals_each_request_alone():
    """Four decode requests of different lengths (tova, h2o, and pyramidkv's masked h2o) in one
    batch give, request by request, what the one-request path gives each alone."""
    g = torch.Generator().manual_seed(5)
    key = torch.randn(BLOCKS, HEADS, PAGE, DIM, generator=g)
    value = torch.randn(BLOCKS, HEADS, PAGE, DIM, generator=g)
    seqs = [13, 40, 7, 25]
    pages = torch.randperm(BLOCKS, generator=g).to(torch.int32)
    table = torch.zeros(len(seqs), BLOCKS, dtype=torch.int32)
    used = 0
    for row, seq in enumerate(seqs):
        n = -(-seq // PAGE)
        table[row, :n] = pages[used:used + n]
        used += n
    query = torch.randn(len(seqs), HEADS * GROUP, DIM, generator=g)
    hidden = torch.zeros(HEADS, 20, dtype=torch.bool)
    hidden[0, 2:6] = True
    kinds = [stats.Observe.LATEST, stats.Observe.ACCUMULATE, stats.Observe.ACCUMULATE,
             stats.Observe.ACCUMULATE]
    obs = [stats.Observation(row, kind) for row, kind in enumerate(kinds)]
    obs[3].visible = [~hidden]
    starts, lens = torch.arange(len(seqs) + 1), torch.tensor(seqs)
    cache = torch.empty(1)

    def run(observations, one_by_one):
        scores = torch.rand(BLOCKS, PAGE, HEADS, generator=torch.Generator().manual_seed(9))
        output = torch.zeros(len(seqs), HEADS * GROUP, DIM)
        plan = stats.StepPlan(observations, [scores], {cache.data_ptr(): 0})
        if one_by_one:
            plan.derived.update(decode=None, each=observations)
        stats.observe_layer(plan, cache, key, value, query, output, starts, lens, table, 0.25)
        return scores, output

    batched, out_batched = run(obs, one_by_one=False)
    each, out_each = run(obs, one_by_one=True)
    assert torch.allclose(batched, each, atol=1e-6)
    assert torch.allclose(out_batched[3], out_each[3], atol=1e-6)
    assert not out_batched[:3].any()  # only the masked request's output is recomputed
    untouched, _ = run([], one_by_one=True)
    assert not torch.allclose(batched, untouched)  # every request wrote its scores
    obs[1].kind = stats.Observe.LATEST  # a wrong kind must change the result
    assert not torch.allclose(run(obs, one_by_one=False)[0], batched)


def _layered_pages(g: torch.Generator, layers: int):
    """Random paged K per layer, one V, and a one-request block table over every page."""
    keys = [torch.randn(BLOCKS, HEADS, PAGE, DIM, generator=g) for _ in range(layers)]
    value = torch.randn(BLOCKS, HEADS, PAGE, DIM, generator=g)
    table = torch.zeros(1, BLOCKS, dtype=torch.int32)
    table[0] = torch.randperm(BLOCKS, generator=g).to(torch.int32)
    return keys, value, table


def _decode_steps(make_observation, queries, initial, keys, value, table, first_len):
    """One decode query a step, through every layer's observe_layer, with the scores starting
    from `initial` and each output from 3.0; (scores, every step's output of every layer)."""
    caches = [torch.empty(1) for _ in keys]
    scores = [s.clone() for s in initial]
    outputs = []
    for t, query in enumerate(queries):
        plan = stats.StepPlan([make_observation()], scores,
                              {c.data_ptr(): i for i, c in enumerate(caches)})
        for layer, cache in enumerate(caches):
            output = torch.full_like(query, 3.0)
            stats.observe_layer(plan, cache, keys[layer], value, query, output,
                                torch.tensor([0, 1]), torch.tensor([first_len + t]), table, 0.25)
            outputs.append(output)
        stats.finish_step(plan)
    return scores, outputs


def test_step_queries_gather_the_same_rows_whether_kept_whole_or_copied(monkeypatch):
    """A short step keeps each layer's query tensor and indexes the rows once at the end; a
    long one (over KEPT_QUERY_ROWS) copies the rows in every layer. Both give the rows of
    every layer, in the batch's order."""
    g = torch.Generator().manual_seed(14)
    layers, rows = 3, 9
    per_layer = [torch.randn(rows, HEADS * GROUP, DIM, generator=g) for _ in range(layers)]
    tokens = torch.tensor([7, 2, 8])
    want = torch.stack([q[tokens] for q in per_layer])

    def gathered(limit: int, skip: int | None = None) -> torch.Tensor:
        monkeypatch.setattr(stats, "KEPT_QUERY_ROWS", limit)
        kept = stats.StepQueries(tokens)
        for layer, query in enumerate(per_layer):
            if layer != skip:
                kept.keep(layer, layers, query)
        assert kept.whole == (rows <= limit)
        return kept.gathered()

    assert torch.equal(gathered(limit=rows), want)
    assert torch.equal(gathered(limit=rows - 1), want)
    assert stats.StepQueries(tokens).gathered() is None  # no layer reached
    # Negative control: a layer the forward never observed reads zeros, not its queries.
    skipped = gathered(limit=rows, skip=1)
    assert torch.equal(skipped[1], torch.zeros_like(want[1]))
    assert not torch.equal(skipped, want)


def test_deferred_decode_queries_equal_measuring_each_step():
    """h2o/snapkv decode steps on CPU buffer their queries (PendingQueries) and fold them in
    at the next compaction: the scores then equal those measured step by step, in every
    layer, own entries starting from zero."""
    g = torch.Generator().manual_seed(11)
    layers, first_len, steps = 2, 17, 6
    keys, value, table = _layered_pages(g, layers)
    queries = [torch.randn(1, HEADS * GROUP, DIM, generator=g) for _ in range(steps)]
    initial = [torch.rand(BLOCKS, PAGE, HEADS, generator=g) for _ in range(layers)]

    def run(pending):
        return _decode_steps(lambda: stats.Observation(0, stats.Observe.ACCUMULATE,
                                                       pending=pending),
                             queries, initial, keys, value, table, first_len)[0]

    each_step = run(None)
    pending = stats.PendingQueries()
    deferred = run(pending)
    assert len(pending) == steps and pending.lengths == list(range(first_len, first_len + steps))
    assert all(torch.equal(d, s) for d, s in zip(deferred, initial, strict=True))  # not yet
    stats.flush_pending_queries(pending, deferred, keys, table[0], PAGE)
    assert len(pending) == 0
    for d, e, s in zip(deferred, each_step, initial, strict=True):
        assert torch.allclose(d, e, atol=1e-5)
        assert not torch.allclose(d, s)
    # While its pages may be shared (prefix caching) the same queries fold into the request's
    # private scores, by physical position: the paged result read at its slots.
    private_pending = stats.PendingQueries()
    run(private_pending)
    longest = first_len + steps - 1
    private = [torch.full((longest + 3, HEADS), 7.0) for _ in range(layers)]
    stats.flush_pending_queries(private_pending, initial, keys, table[0], PAGE, private)
    slots = stats.page_slots(table[0], longest, PAGE)
    for layer in range(layers):
        paged = each_step[layer].view(-1, HEADS)[slots]
        want = paged - initial[layer].view(-1, HEADS)[slots] + 7.0  # over 7 instead
        want[first_len - 1:] = paged[first_len - 1:]  # the queries' own entries: from zero
        assert torch.allclose(private[layer][:longest], want, atol=1e-5)
        assert torch.equal(private[layer][longest:], torch.full((3, HEADS), 7.0))
    # Negative control: folded in against the other layer's keys, the scores differ.
    swapped_pending = stats.PendingQueries()
    swapped = run(swapped_pending)
    stats.flush_pending_queries(swapped_pending, swapped, keys[::-1], table[0], PAGE)
    assert not torch.allclose(swapped[0], each_step[0], atol=1e-3)


def test_a_buffered_latest_query_scored_at_the_compaction_equals_measuring_it():
    """tova on CPU buffers the last query of the step before a compaction (here a 5-query
    prefill chunk) and scores it at the compaction (latest_query_scores): the same scores,
    in every layer, as LATEST measured in that step."""
    g = torch.Generator().manual_seed(12)
    layers, length, chunk = 2, 21, 5
    keys, value, table = _layered_pages(g, layers)
    query = torch.randn(chunk, HEADS * GROUP, DIM, generator=g)
    caches = [torch.empty(1) for _ in range(layers)]

    def run(pending):
        scores = [torch.rand(BLOCKS, PAGE, HEADS, generator=g) for _ in range(layers)]
        ob = stats.Observation(0, stats.Observe.LATEST, pending=pending)
        plan = stats.StepPlan([ob], scores, {c.data_ptr(): i for i, c in enumerate(caches)})
        for layer in range(layers):
            stats.observe_layer(plan, caches[layer], keys[layer], value, query,
                                torch.zeros_like(query), torch.tensor([0, chunk]),
                                torch.tensor([length]), table, 0.25)
        stats.finish_step(plan)
        slots = stats.page_slots(table[0], length, PAGE)
        return torch.stack([s.view(-1, HEADS)[slots].T for s in scores])

    measured = run(None)
    pending = stats.PendingQueries()
    untouched = run(pending)
    assert len(pending) == 1 and pending.lengths == [length]
    scored = stats.latest_query_scores(pending, keys, table[0].long(), length)
    assert torch.allclose(scored, measured, atol=1e-6)
    assert not torch.allclose(untouched, measured)  # the step itself measured nothing
    # Negative control: the chunk's first query instead of its last gives other scores.
    first = stats.PendingQueries([torch.stack([query[0]] * layers)], [length], 0.25)
    assert not torch.allclose(stats.latest_query_scores(first, keys, table[0].long(), length),
                              measured, atol=1e-3)


def test_hidden_entries_deferred_equal_masked_each_step_and_no_output_is_recomputed():
    """pyramidkv on CPU: the backend skips the hidden entries itself (backend_hides), so its
    decode queries are deferred like h2o's. Folded with the visible masks they equal the
    masked statistics measured step by step, and no step rewrites the backend's output."""
    g = torch.Generator().manual_seed(13)
    layers, first_len, steps = 2, 17, 5
    keys, value, table = _layered_pages(g, layers)
    queries = [torch.randn(1, HEADS * GROUP, DIM, generator=g) for _ in range(steps)]
    initial = [torch.rand(BLOCKS, PAGE, HEADS, generator=g) for _ in range(layers)]
    held = first_len - 1
    visible = [torch.rand(HEADS, held, generator=g) > 0.4 for _ in range(layers)]

    def run(pending, backend_hides=True):
        return _decode_steps(lambda: stats.Observation(0, stats.Observe.ACCUMULATE,
                                                       pending=pending, visible=visible,
                                                       backend_hides=backend_hides),
                             queries, initial, keys, value, table, first_len)

    each_step, outputs = run(None)
    assert all(torch.equal(o, torch.full_like(o, 3.0)) for o in outputs)  # backend's output kept
    _, recomputed = run(None, backend_hides=False)  # the masked path rewrites it
    assert not any(torch.equal(o, torch.full_like(o, 3.0)) for o in recomputed)
    assert stats.defers(stats.Observation(0, stats.Observe.ACCUMULATE, visible=visible,
                                          backend_hides=True), 1)
    pending = stats.PendingQueries()
    deferred, _ = run(pending)
    assert len(pending) == steps
    stats.flush_pending_queries(pending, deferred, keys, table[0], PAGE, visible=visible)
    for d, e, s in zip(deferred, each_step, initial, strict=True):
        assert torch.allclose(d, e, atol=1e-5)
        assert not torch.allclose(d, s)
    # Negative control: folded without the masks, the queries' attention lands on hidden
    # entries too, and the scores differ.
    unmasked_pending = stats.PendingQueries()
    unmasked, _ = run(unmasked_pending)
    stats.flush_pending_queries(unmasked_pending, unmasked, keys, table[0], PAGE)
    assert not torch.allclose(unmasked[0], each_step[0], atol=1e-3)


def test_hidden_entries_are_ordered_into_whole_first_pages():
    """hidden_first puts each layer's hidden entries in its first pages (both parts in logical
    order) and counts the pages; a layer hiding part of a page, or different counts per head,
    keeps the masked layout (None)."""
    from vllm_evict.core.state import hidden_first

    keep = torch.arange(12).expand(2, 2, 12).clone()  # [layers, kv_heads, target]
    visible = torch.ones(2, 2, 12, dtype=torch.bool)
    visible[1, :, [1, 4, 5, 9]] = False  # layer 1 hides 4 entries: one page of 4
    ordered, shown, pages = hidden_first(keep, visible, page_size=4)
    assert pages == [0, 1]
    assert ordered[0, 0].tolist() == list(range(12))
    assert ordered[1, 1].tolist() == [1, 4, 5, 9, 0, 2, 3, 6, 7, 8, 10, 11]
    assert shown[1, 0].tolist() == [False] * 4 + [True] * 8
    assert hidden_first(keep, visible, page_size=8)[2] is None  # half a page
    visible[1, 0, 0] = False  # head 0 hides one more than head 1
    assert hidden_first(keep, visible, page_size=4)[2] is None
