"""A real `vllm serve` with the plugin, driven over HTTP by the openai client.

The model is the tiny Llama in bf16 (its saved dtype: no --dtype), as deployments run.
The server's default is StreamingLLM with a 128-token budget; requests may opt out with
vllm_xargs {"kv_eviction": "none"}. Its KV pool is fixed at 96 pages of 32 tokens (3072
tokens), small enough that six long requests cannot all fit without eviction.
"""

from __future__ import annotations

import asyncio
import random
import re

import openai
import pytest

from tests.helpers.formula import expected_eviction, expected_pages_freed
from tests.helpers.server import VllmServer
from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.dump import PAGE_TRACE_DIR_ENV, read_page_trace

pytestmark = pytest.mark.server

BUDGET, WINDOW, SLACK, PAGE, PAGES = 128, 16, 32, 32, 96
SERVER_ARGS = [
    "--enforce-eager", "--max-model-len", "2048", "--block-size", str(PAGE),
    "--max-num-batched-tokens", "256", "--num-gpu-blocks-override", str(PAGES),
    "--max-num-seqs", "16", "--seed", "0",
    "--kv-eviction", "streaming", "--kv-budget", str(BUDGET), "--kv-window", str(WINDOW),
    "--kv-slack", str(SLACK),
]
SERVER_CFG = EvictionConfig(policy="streaming", budget=BUDGET, window=WINDOW, slack=SLACK)
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog while the server keeps "
                      "only a window of recent tokens and a few sinks"] * 40)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    srv = VllmServer(tiny_model, SERVER_ARGS, work / "serve.log",
                     env={PAGE_TRACE_DIR_ENV: str(work / "pages")})
    srv.page_trace_dir = work / "pages"
    print(f"\nvllm serve healthy after {srv.start_seconds:.1f} s")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


async def test_completion_streaming_and_not_agree_and_evict(server, client):
    prompt = _ids(11, 400)
    log_before = len(server.log())
    kwargs = dict(model=server_model(server), prompt=prompt, max_tokens=48, temperature=0.0,
                  extra_body={"ignore_eos": True})
    full = await client.completions.create(**kwargs)
    assert full.usage.prompt_tokens == 400 and full.usage.completion_tokens == 48
    assert full.choices[0].finish_reason == "length"
    pieces = [chunk.choices[0].text async for chunk in await client.completions.create(
        **kwargs, stream=True) if chunk.choices]
    assert "".join(pieces) == full.choices[0].text
    _, evicted = expected_eviction(SERVER_CFG, 400, 48)
    for _ in range(50):  # the engine core's log lines reach the file a moment later
        found = re.findall(r"vllm-evict: request \S+ done: .* evicted_tokens=(\d+)",
                           server.log()[log_before:])
        if len(found) == 2:
            break
        await asyncio.sleep(0.1)
    assert [int(n) for n in found] == [evicted, evicted]  # both requests, as the formula says


async def test_chat_streaming_and_not_agree(server, client):
    kwargs = dict(model=server_model(server), max_tokens=32, temperature=0.0,
                  messages=[{"role": "user", "content": LONG_TEXT}],
                  extra_body={"ignore_eos": True})
    full = await client.chat.completions.create(**kwargs)
    assert full.usage.prompt_tokens > BUDGET + SLACK
    assert full.choices[0].message.content
    pieces = [chunk.choices[0].delta.content or "" async for chunk in
              await client.chat.completions.create(**kwargs, stream=True) if chunk.choices]
    assert "".join(pieces) == full.choices[0].message.content


async def test_per_request_policy_changes_the_output(server, client):
    prompt = _ids(12, 400)
    outs = []
    for xargs in ({"kv_eviction": "none"}, {"kv_eviction": "streaming", "kv_budget": 64}, None):
        res = await client.completions.create(
            model=server_model(server), prompt=prompt, max_tokens=64, temperature=0.0,
            extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})})
        outs.append(res.choices[0].text)
    assert outs[0] != outs[1] and outs[0] != outs[2] and outs[1] != outs[2]


@pytest.mark.parametrize("xargs, needle", [
    ({"kv_eviction": "bogus"}, "allowed: none, "),
    ({"kv_budget": 10}, "budget must be > sink_tokens + window"),
    ({"kv_budget": "big"}, "must be an integer"),
    ({"kv_budget": -5}, "must be an integer > 0"),
    ({"kv_window": 8}, "per-request eviction keys are"),
])
async def test_bad_request_values_get_400_and_the_server_keeps_serving(server, client, xargs, needle):
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=server_model(server), prompt=_ids(13, 50),
                                        max_tokens=4, extra_body={"vllm_xargs": xargs})
    assert err.value.status_code == 400 and needle in str(err.value)
    ok = await client.completions.create(model=server_model(server), prompt=_ids(14, 50),
                                         max_tokens=4)
    assert ok.choices[0].finish_reason == "length"


async def _load(server, client, xargs, seeds, prompt_len=900, max_tokens=300):
    """Run concurrent long streamed requests; report how they overlapped and vLLM's counters.

    "All ran at once" comes from the scheduler's own running list at every step
    (VLLM_EVICT_PAGE_TRACE_DIR), not from the client's clock, which a busy machine skews.
    Preemptions and freed pages come from counters, which no sampling can miss.
    """
    before = server.metrics()
    trace_before = len(read_page_trace(server.page_trace_dir))

    async def one(seed):
        response = await client.completions.create(
            model=server_model(server), prompt=_ids(seed, prompt_len), max_tokens=max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "vllm_xargs": xargs})
        completion_tokens = 0
        async for chunk in response:
            if chunk.usage:
                completion_tokens = chunk.usage.completion_tokens
        return completion_tokens

    results = await asyncio.gather(*(one(s) for s in seeds))
    after = server.metrics()
    running: dict[int, int] = {}  # step -> requests running in it
    for line in read_page_trace(server.page_trace_dir)[trace_before:]:
        running[line["step"]] = running.get(line["step"], 0) + 1

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {"completion_tokens": list(results),
            "all_ran_at_once": max(running.values()) == len(seeds),
            "preemptions": delta("vllm:num_preemptions_total"),
            "pages_freed": delta("vllm_evict:pages_freed_total")}


async def test_evicted_pages_go_back_to_the_pool(server, client):
    """Six requests of 900 + 300 tokens need 228 pages without eviction; the pool has 96."""
    n = 6
    evict = await _load(server, client, {"kv_eviction": "streaming"}, range(100, 100 + n))
    full = await _load(server, client, {"kv_eviction": "none"}, range(200, 200 + n))
    print(f"\nwith eviction: {evict}\nwithout:       {full}")
    assert evict["completion_tokens"] == [300] * n and full["completion_tokens"] == [300] * n
    assert evict["all_ran_at_once"] and evict["preemptions"] == 0
    assert evict["pages_freed"] == n * expected_pages_freed(SERVER_CFG, 900, 300, PAGE) > 0
    assert full["pages_freed"] == 0
    assert full["preemptions"] > 0 or not full["all_ran_at_once"]


def server_model(server: VllmServer) -> str:
    return server.proc.args[2]


async def test_metrics_add_up_with_the_per_request_log(server, client):
    """vllm_evict:* metrics on vLLM's /metrics agree with the scheduler's per-request lines,
    and this test's own requests move them by exactly what the length formula predicts."""
    policies = ["h2o", "streaming", "tova", "none"]
    before = server.metrics()
    await asyncio.gather(*(client.completions.create(
        model=server_model(server), prompt=_ids(300 + i, 500), max_tokens=40, temperature=0.0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"kv_eviction": policy}})
        for i, policy in enumerate(policies)))
    await asyncio.sleep(1.0)
    m = server.metrics()

    def delta(name):
        return m.get(name, 0.0) - before.get(name, 0.0)

    compactions, evicted = expected_eviction(SERVER_CFG, 500, 40)
    assert compactions >= 1
    assert delta("vllm_evict:requests_total") == len(policies)
    assert delta("vllm_evict:compactions_total") == 3 * compactions  # none never compacts
    assert delta("vllm_evict:tokens_evicted_total") == 3 * evicted
    assert delta("vllm_evict:pages_freed_total") == 3 * expected_pages_freed(SERVER_CFG, 500, 40, PAGE)
    assert delta("vllm_evict:scoring_seconds_total") > 0  # h2o and tova measured attention
    assert delta("vllm_evict:compaction_seconds_total") > 0
    assert delta("vllm_evict:policy_failures_total") == 0
    logged = re.findall(r"vllm-evict: request \S+ done: .* evicted_tokens=(\d+) pages_freed=(\d+)",
                        server.log())
    assert m["vllm_evict:tokens_evicted_total"] == sum(int(e) for e, _ in logged)
    assert m["vllm_evict:pages_freed_total"] == sum(int(p) for _, p in logged)
    assert m["vllm_evict:kept_fraction_count"] == len(logged)
    assert m["vllm:num_requests_running"] == 0  # vLLM's own metrics are still exported
