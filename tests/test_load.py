"""Load and fuzz against a real `vllm serve`: mixed policies and budgets, full-cache requests,
aborts, disconnects and bad requests, in a KV pool small enough to force preemption.

Passes when every finished request is correct (greedy: the tokens of the same request served
alone; an eviction request that was preempted restarts its eviction, so for those only the
length is checked), the server stays healthy, the page pool is whole again afterwards (no page
leaked), and the plugin's metrics add up.
"""

from __future__ import annotations

import asyncio
import os
import random
import re

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import VllmServer
from vllm_evict.core.config import EvictionConfigError, resolve_request

pytestmark = pytest.mark.server

PAGES = 40
SERVER_KV = {"policy": "none", "budget": 96, "sink_tokens": 4, "window": 16, "slack": 32,
             "budget_max": 256}
SERVER_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--block-size", "32",
    "--num-gpu-blocks-override", str(PAGES), "--max-num-batched-tokens", "256",
    "--max-num-seqs", "16", "--seed", "0", "--scheduling-policy", "priority",
    "--kv-eviction", "none", "--kv-budget", "96", "--kv-window", "16", "--kv-slack", "32",
    "--kv-budget-max", "256",
]
POLICIES = ["streaming", "h2o", "tova", "snapkv", "pyramidkv", "keydiff", "knorm", "random"]


# Two third-party policies, installed the way a package would be (an entry point in a
# dist-info on the path of every server process), that fail at every compaction.
BROKEN_POLICIES = """
from dataclasses import dataclass

from vllm_evict.core.policies import Policy, Statistic


@dataclass
class Raising(Policy):
    name = "raising"
    summary = "raises in score()"

    def score(self, inp):
        raise RuntimeError("deliberately broken policy")


@dataclass
class Blind(Policy):
    name = "blind"
    summary = "raises when asked what to measure"
    statistic = Statistic.ACCUMULATED_ATTENTION

    def observation(self, *args):
        raise RuntimeError("deliberately broken observation")


@dataclass
class Malformed(Policy):
    name = "malformed"
    summary = "returns one index too few"

    def select(self, inp):
        return inp.positions[..., : inp.target_length - 1].clone()
"""


def _install_broken_policies(path) -> None:
    (path / "broken_policies.py").write_text(BROKEN_POLICIES)
    dist = path / "broken_policies-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-policies\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vllm_evict.policies]\n"
                                           "raising = broken_policies:Raising\n"
                                           "malformed = broken_policies:Malformed\n"
                                           "blind = broken_policies:Blind\n")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("load")
    plugins = work / "site"
    plugins.mkdir()
    _install_broken_policies(plugins)
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p)
    srv = VllmServer(tiny_model, SERVER_ARGS, work / "serve.log", env={"PYTHONPATH": path})
    yield srv
    srv.stop()


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


def _model(server: VllmServer) -> str:
    return server.proc.args[2]


async def _complete(client, server, prompt, xargs, max_tokens, priority=0):
    res = await client.completions.create(
        model=_model(server), prompt=prompt, max_tokens=max_tokens, temperature=0.0,
        extra_body={"ignore_eos": True, "priority": priority,
                    **({"vllm_xargs": xargs} if xargs else {})})
    return res.choices[0].text, res.usage.completion_tokens, res.id


async def _abort_after(client, server, prompt, xargs, chunks):
    stream = await client.completions.create(
        model=_model(server), prompt=prompt, max_tokens=400, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "vllm_xargs": xargs})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen >= chunks:
            break
    await stream.close()
    return seen


async def _disconnect(server, prompt):
    async with httpx.AsyncClient(timeout=30) as http, http.stream(
            "POST", f"{server.url}/v1/completions",
            json={"model": _model(server), "prompt": prompt, "max_tokens": 400, "stream": True,
                  "ignore_eos": True, "vllm_xargs": {"kv_eviction": "h2o"}}) as response:
        async for _ in response.aiter_lines():
            break  # drop the connection after the first event


async def test_mixed_load_loses_nothing(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    rng = random.Random(5)
    # Two full-cache requests first, scheduled before everyone else (priority -1): each ends at
    # 32 of the pool's 40 pages, so vLLM must preempt (others, or one of them) to finish them.
    jobs = [(_ids(400 + i, 300), {"kv_eviction": "none"}, 700, -1) for i in range(2)]
    # (prompt, xargs, max_tokens, priority)
    for i, policy in enumerate(POLICIES):
        jobs.append((_ids(500 + i, rng.randrange(300, 600)),
                     {"kv_eviction": policy, "kv_budget": rng.choice([64, 96, 128])}, 96, 0))
    for i in range(4):
        jobs.append((_ids(600 + i, rng.randrange(200, 400)), {"kv_eviction": "none"}, 96, 0))
    jobs.append((_ids(700, 350), None, 80, 0))  # the server default (none)
    before = server.metrics()

    finished = [_complete(client, server, *job) for job in jobs]
    aborted = [_abort_after(client, server, _ids(800 + i, 500), {"kv_eviction": "streaming"}, 5)
               for i in range(2)]
    bad = [_complete(client, server, _ids(900, 20), {"kv_budget": 999}, 4),
           _complete(client, server, _ids(901, 20), {"kv_eviction": 3}, 4)]
    results = await asyncio.gather(*finished, *aborted, _disconnect(server, _ids(950, 500)), *bad,
                                   return_exceptions=True)
    served, rest = results[: len(jobs)], results[len(jobs):]
    assert all(not isinstance(r, BaseException) for r in served), served
    assert [r[1] for r in served] == [n for _, _, n, _ in jobs]
    assert rest[:2] == [5, 5]
    assert all(isinstance(r, openai.BadRequestError) for r in rest[-2:]), rest[-2:]

    # Healthy, and every page is back in the pool (usage 0) once the engine is idle.
    await asyncio.sleep(2.0)
    assert httpx.get(f"{server.url}/health").status_code == 200
    after = server.metrics()
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0.0, "pages leaked"
    preemptions = after["vllm:num_preemptions_total"] - before.get("vllm:num_preemptions_total", 0)
    assert preemptions > 0, "the pool was meant to be small enough to force preemption"

    # Metrics add up: one request count per request that reached the engine.
    reached = len(jobs) + 3  # + 2 aborted + 1 disconnected (the 400s never reach it)
    assert after["vllm_evict:requests_total"] - before.get("vllm_evict:requests_total", 0) == reached
    logged = re.findall(r"evicted_tokens=(\d+) pages_freed=(\d+)", server.log())
    assert after["vllm_evict:tokens_evicted_total"] == sum(int(e) for e, _ in logged)

    # Correct: each finished request again, alone, gives the same tokens (unless an eviction
    # request was preempted, which restarts its eviction).
    preempted = set(re.findall(r"vllm-evict: request (\S+) preempted", server.log()))
    compared = 0
    for (prompt, xargs, n, _), (text, _, rid) in zip(jobs, served, strict=True):
        evicting = xargs is not None and xargs.get("kv_eviction") != "none"
        if evicting and any(p.startswith(rid) for p in preempted):
            continue
        alone, _, _ = await _complete(client, server, prompt, xargs, n)
        assert alone == text, (xargs, rid)
        compared += 1
    assert compared >= len(jobs) - 4
    print(f"\nload: {len(jobs)} served, 2 aborted, 1 disconnected, 2 rejected; "
          f"preemptions {preemptions:g}; compared alone {compared}; preempted eviction "
          f"requests {len(preempted)}")


@pytest.mark.skipif(
    os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1",
    reason="needs the machine to itself: beside another test worker the eviction requests "
           "reached the engine one after another and none was preempted (3 rounds, CI); run "
           "it with VLLM_EVICT_TEST_WORKERS=1")
async def test_preempted_eviction_requests_restart_and_finish(server):
    """Eviction requests preempted mid-decode restart from scratch (vLLM recomputes them, the
    plugin resets their eviction state) and finish with every token, no page lost.

    Which requests vLLM preempts must not depend on timing. Two full-cache requests (priority 0)
    grow from 4 to 19 pages each: 38 of the 39 usable pages, so they never preempt each other.
    Three eviction requests (priority 1, about 5 pages each) decode beside them and still have
    hundreds of tokens to go when the full-cache requests pass 12 pages each; from then on the
    priority scheduler must preempt eviction requests. Earlier forms of this test depended on
    timing: with the full-cache requests outgrowing the pool, one of them preempted first headed
    the waiting queue and kept the eviction requests out (seen in CI); with the full-cache
    requests sent only once the eviction requests were decoding, a slow client let those finish
    first (seen with two test workers).
    """
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    policies = ["streaming", "h2o", "pyramidkv"]
    prompt_len, tokens_evicting = 150, 850

    async def complete(i: int, policy: str, priority: int, prompt: int, max_tokens: int) -> int:
        res = await client.completions.create(
            model=_model(server), prompt=_ids(1000 + i, prompt), max_tokens=max_tokens,
            temperature=0.0, extra_body={"ignore_eos": True, "priority": priority,
                                         "vllm_xargs": {"kv_eviction": policy}})
        return res.usage.completion_tokens

    pattern = r"vllm-evict: request \S+ done: policy=(\w+) budget=\d+ logical_len=(\d+)"

    async def attempt(seed: int) -> list[str]:
        """One round; every request must finish with every token. Returns the preemption
        points of the eviction requests."""
        log_before = len(server.log())
        full_cache = [complete(seed + len(policies) + i, "none", 0, 100, 500) for i in range(2)]
        evicting = [complete(seed + i, policy, 1, prompt_len, tokens_evicting)
                    for i, policy in enumerate(policies)]
        counts = await asyncio.gather(*full_cache, *evicting)
        assert counts == [500] * 2 + [tokens_evicting] * len(policies)
        # The engine core logs from its own process; give its lines a moment to reach the file.
        for _ in range(50):
            new_log = server.log()[log_before:]
            if len(re.findall(pattern, new_log)) == len(policies):
                break
            await asyncio.sleep(0.2)
        done = re.findall(pattern, new_log)
        assert sorted(p for p, _ in done) == sorted(policies)
        # every token computed (the last one is never fed)
        assert all(int(n) == prompt_len + tokens_evicting - 1 for _, n in done)
        return re.findall(r"vllm-evict: request \S+ preempted at (\d+) tokens", new_log)

    # The requests reach the engine when the client and the API server get to them; on a busy
    # machine (two test workers) the eviction requests sometimes arrived one after another and
    # none was preempted (seen in CI). So up to three rounds, each with fresh prompts: the test
    # needs one round with preemptions, and every round must finish every request whole.
    for round_ in range(3):
        preempted = await attempt(1000 + 100 * round_)
        if preempted:
            break
    # After the prompt: mid-decode, or at the first compaction (at the prompt's end), whose
    # copy on write needs fresh pages before it returns the shared ones.
    assert preempted and all(int(n) >= prompt_len for n in preempted), preempted
    await asyncio.sleep(1.0)
    assert server.metrics()["vllm:kv_cache_usage_perc"] == 0.0


async def test_a_failing_policy_falls_back_and_touches_no_other_request(server):
    """Requests whose policy raises (in score() or in observation()), or returns a malformed
    selection, under load beside
    healthy ones: each of their compactions keeps sinks + recent tokens instead (so they give
    exactly the tokens of kv_eviction=streaming), the failure is logged once per request and
    counted per compaction, every other request gives its tokens served alone, and the server
    stays healthy."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    jobs = [(_ids(1100 + i, 250), {"kv_eviction": policy}, 120)
            for i, policy in enumerate(["raising", "raising", "malformed", "malformed", "blind",
                                        "h2o", "snapkv", "streaming", "none"])]
    before, log_before = server.metrics(), len(server.log())
    served = await asyncio.gather(*(_complete(client, server, *job) for job in jobs))
    assert [n for _, n, _ in served] == [120] * len(jobs)
    assert httpx.get(f"{server.url}/health").status_code == 200

    await asyncio.sleep(1.0)
    after, log = server.metrics(), server.log()[log_before:]
    preempted = set(re.findall(r"vllm-evict: request (\S+) preempted", log))
    for (prompt, xargs, n), (text, _, rid) in zip(jobs, served, strict=True):
        if any(p.startswith(rid) for p in preempted):
            continue  # restarted eviction: not comparable with a run alone
        if xargs["kv_eviction"] == "blind":
            continue  # it measured nothing: no reference to compare with
        broken = xargs["kv_eviction"] in ("raising", "malformed")
        alone, _, _ = await _complete(client, server, prompt,
                                      {"kv_eviction": "streaming"} if broken else xargs, n)
        assert alone == text, (xargs, rid)
    for policy, requests in (("raising", 2), ("malformed", 2), ("blind", 1)):
        failed = re.findall(rf"policy '{policy}' failed for request (\S+)", log)
        assert len(failed) == len(set(failed)) == requests, log[-3000:]
    assert re.search(r"RuntimeError: deliberately broken policy", log)
    assert "select() must return int64" in log

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    # One failure per compaction of the broken requests, none for anyone else.
    families = {f.name: f for f in text_string_to_metric_families(
        httpx.get(f"{server.url}/metrics").text)}
    failures = {s.labels["policy"]: s.value for s in families["vllm_evict:policy_failures"].samples
                if s.name.endswith("_total")}
    compactions = {s.labels["policy"]: s.value for s in families["vllm_evict:compactions"].samples
                   if s.name.endswith("_total")}
    assert set(failures) == {"raising", "malformed", "blind"}
    broken_selection = {p: failures[p] for p in ("raising", "malformed")}
    assert broken_selection == {p: compactions[p] for p in broken_selection}
    assert all(failures.values())  # blind: one per step it was asked what to measure
    assert delta("vllm_evict:policy_failures_total") == sum(failures.values())


XARG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10_000), st.floats(-1, 5000),
                        st.text(max_size=12), st.sampled_from(["none", *POLICIES]),
                        st.lists(st.integers(0, 5), max_size=3))
XARGS = st.dictionaries(st.sampled_from(["kv_eviction", "kv_budget", "kv_window", "kv_x",
                                         "other"]), XARG_VALUES, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xargs=XARGS)
def test_fuzzed_vllm_xargs_get_a_clear_400_or_are_served(server, xargs):
    # vLLM's own schema takes str | int | float | list values (None is a 400 there, and bools
    # arrive as ints); everything it accepts is then ours to judge.
    schema_ok = all(v is not None for v in xargs.values())
    try:
        resolve_request({"kv_eviction": SERVER_KV},
                      {k: int(v) if isinstance(v, bool) else v for k, v in xargs.items()})
        expect_ok = schema_ok
    except EvictionConfigError:
        expect_ok = False
    response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": _model(server), "prompt": _ids(1, 40), "max_tokens": 2, "vllm_xargs": xargs})
    if response.status_code == 400:
        assert not expect_ok, response.text
        assert "vllm_xargs" in response.json()["error"]["message"] + str(response.json()["error"].get("param"))
    else:
        assert response.status_code == 200 and expect_ok, (response.status_code, response.text)
    assert httpx.get(f"{server.url}/health").status_code == 200
