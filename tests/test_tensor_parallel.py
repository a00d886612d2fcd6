"""Tensor parallelism: two CPU workers (vLLM's mp executor), each holding one of the tiny
model's two KV heads. Each rank selects for its own heads and computes P from the request's
length alone, so no rank talks to another about eviction; the greedy tokens must equal TP=1's
and every rank's dump must agree on P at every compaction."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.conftest import CORES, run_engine_job
from vllm_evict.core.dump import records_for

pytestmark = pytest.mark.engine

# Per KV head: under TP each rank holds only its own KV heads, so `heads: shared` (the score
# policies' default) shares a set across the rank's heads only, and its tokens legitimately
# differ from TP=1's (docs/architecture.md). Per-head selection is rank-local, hence exact.
SERVER = {"policy": "none", "budget": 64, "sink_tokens": 4, "window": 16, "slack": 16,
          "policy_args": {"h2o": {"heads": "per_head"}, "keydiff": {"heads": "per_head"}}}
POLICIES = ["streaming", "h2o", "keydiff"]


def _spec(model: str, tp: int) -> dict:
    rng = random.Random(3)
    engine = {"model": model, "max_model_len": 1024, "dtype": "float32", "enforce_eager": True,
              "seed": 0, "block_size": 32, "max_num_batched_tokens": 256,
              "tensor_parallel_size": tp, "additional_config": {"kv_eviction": SERVER}}
    if tp > 1:
        engine["distributed_executor_backend"] = "mp"
    return {"engine": engine, "requests": [
        {"prompt_token_ids": [rng.randrange(10, 4000) for _ in range(300)],
         "sampling": {"max_tokens": 120, "temperature": 0.0, "ignore_eos": True},
         "extra_args": {"kv_eviction": policy}} for policy in POLICIES]}


def _per_rank(dump_dir: Path) -> dict[int, list[dict]]:
    ranks: dict[int, list[dict]] = {}
    for file in sorted(dump_dir.glob("kept-rank*.jsonl")):
        rank = int(file.name.removeprefix("kept-rank").split("-")[0])
        ranks.setdefault(rank, []).extend(json.loads(x) for x in file.read_text().splitlines())
    return ranks


def test_tp2_gives_tp1_tokens_and_ranks_agree_on_p(tiny_model, tmp_path, monkeypatch):
    one = run_engine_job(_spec(tiny_model, 1), tmp_path / "tp1", dump_dir=tmp_path / "dump1")
    # Both workers share this machine's one NUMA node: vLLM needs their cores named (one core
    # twice on a one-core machine).
    monkeypatch.setitem(os.environ, "VLLM_CPU_OMP_THREADS_BIND", f"{CORES[0]}|{CORES[-1]}")
    two = run_engine_job(_spec(tiny_model, 2), tmp_path / "tp2", dump_dir=tmp_path / "dump2")
    assert [r["token_ids"] for r in two["results"]] == [r["token_ids"] for r in one["results"]]

    ranks = _per_rank(tmp_path / "dump2")
    assert sorted(ranks) == [0, 1]
    tp1 = _per_rank(tmp_path / "dump1")[0]
    for result in two["results"]:
        per_rank = [records_for(ranks[r], result["request_id"]) for r in (0, 1)]
        assert len(per_rank[0]) >= 2 and len(per_rank[0]) == len(per_rank[1])
        for a, b in zip(*per_rank, strict=True):
            assert a["logical_len"] == b["logical_len"]
            assert len(a["kept"][0]) == len(b["kept"][0]) == 1  # one KV head per rank
            lengths = {len(head) for rec in (a, b) for layer in rec["kept"] for head in layer}
            assert len(lengths) == 1, lengths  # the same P on both ranks, every layer
    # Streaming keeps the same positions whatever the rank: rank r's head is TP=1's head r.
    stream_id = two["results"][0]["request_id"]
    solo = records_for(tp1, one["results"][0]["request_id"])
    for r in (0, 1):
        for mine, full in zip(records_for(ranks[r], stream_id), solo, strict=True):
            assert [layer[0] for layer in mine["kept"]] == [layer[r] for layer in full["kept"]]
