"""Ray Serve LLM with the plugin, for real, on CPU: deploy/ray/serve_app.py's LLMConfig with the
tiny model, through Serve's OpenAI app, one replica and then two.

Ray Serve LLM runs a CPU vLLM with vLLM's mp executor inside each replica (ray PR 58334, ray
>= 2.54): vLLM's engine core is a child process of the replica actor, and its log lines land in
the replica worker's log files under the Ray session directory. That is where this test looks
for the plugin's per-request line (`vllm-evict: request ... done: policy=...`): the plugin's
Prometheus counters live in the engine core process, which Ray Serve does not export.

The greedy tokens are compared with a plain `vllm serve` run with the same settings, and no
process the test started may outlive it. Select with `-m ray`; skipped without the [ray] extra.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.helpers.formula import expected_eviction
from tests.helpers.server import VllmServer, free_port
from vllm_evict.core.config import EvictionConfig

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("ray.serve.llm")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "tiny"
BUDGET, WINDOW, SLACK, REQUEST_BUDGET = 128, 16, 32, 64
EVICTION = {"policy": "streaming", "budget": BUDGET, "window": WINDOW, "slack": SLACK,
            "budget_min": None, "budget_max": None, "allowed_policies": None}
ENGINE = {"enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 8, "seed": 0}
SERVE_FLAGS = ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8", "--seed", "0",
               "--kv-eviction", "streaming", "--kv-budget", str(BUDGET), "--kv-window",
               str(WINDOW), "--kv-slack", str(SLACK)]
# What the replicas need from the test's environment (conftest sets these): the offline hub,
# vLLM's CPU KV pool and its cache/IPC folders.
PASS_ENV = ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
            "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH",
            "TRITON_CACHE_DIR")
DONE = re.compile(r"vllm-evict: request (\S+) done: policy=(\w+) budget=(\d+) logical_len=(\d+) "
                  r"kept=(\d+) evicted_tokens=(\d+) pages_freed=(\d+)")
# Two engines on one machine: vLLM's default binds each engine's worker to the same core. The
# reference server runs with the same setting, so both compute with the same threads.
THREADS_BIND = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
PROMPT_LEN, MAX_TOKENS = 300, 40  # 340 > budget + slack: every request evicts


def _serve_app():
    spec = importlib.util.spec_from_file_location("serve_app", ROOT / "deploy/ray/serve_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(PROMPT_LEN)]


def _request(seed: int, xargs: dict | None = None) -> dict:
    extra = {"ignore_eos": True, "return_token_ids": True}
    if xargs:
        extra["vllm_xargs"] = xargs
    return dict(prompt=_prompt(seed), max_tokens=MAX_TOKENS, temperature=0.0, extra_body=extra)


PER_REQUEST = {"kv_eviction": "streaming", "kv_budget": REQUEST_BUDGET}
REQUESTS = [_request(1), _request(2, PER_REQUEST)]


async def _complete(base_url: str, model: str, requests: list[dict]) -> list[tuple]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                timeout=600)
    outs = await asyncio.gather(*(client.completions.create(model=model, **r) for r in requests))
    await client.close()
    return [(c.choices[0].text, getattr(c.choices[0], "token_ids", None)) for c in outs]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The same requests on a plain `vllm serve` with the same settings (before Ray starts, so
    the two never share the 2 cores)."""
    with VllmServer(tiny_model, SERVE_FLAGS, tmp_path_factory.mktemp("ref") / "serve.log",
                    env={"VLLM_CPU_OMP_THREADS_BIND": THREADS_BIND}) as srv:
        return asyncio.run(_complete(srv.url, tiny_model, REQUESTS))


@pytest.fixture(scope="module")
def cluster(reference):
    # Ray's socket paths must stay under 108 bytes: a short folder in /tmp, not pytest's tmp.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = free_port()
    # Logical CPUs, not cores: each LLM replica's placement bundle holds one and the OpenAI
    # ingress replica takes one, so two LLM replicas need 3; the machine's 2 cores are shared.
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = psutil.Process().children(recursive=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "logs": Path(temp) / "session_latest" / "logs",
               "procs": started}
    finally:
        ours = {p for p in psutil.Process().children(recursive=True)} | set(started)
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(p) for p in ours):
            time.sleep(1)
        left = [f"{p.pid} {p.name()}" for p in ours if _alive(p)]
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes left after ray.shutdown(): {left}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _deploy(model: str, replicas: int) -> float:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env["VLLM_CPU_OMP_THREADS_BIND"] = THREADS_BIND
    config = _serve_app().llm_config(model, MODEL_ID, eviction=EVICTION, replicas=replicas,
                                     engine_kwargs=ENGINE, env_vars=env)
    from ray.serve.llm import build_openai_app

    started = time.perf_counter()
    serve.run(build_openai_app({"llm_configs": [config]}), name="llm", route_prefix="/")
    return time.perf_counter() - started


def _done_lines(logs: Path) -> dict[str, dict[str, tuple]]:
    """Plugin log lines by worker process (one replica each: the engine core it spawns writes
    to the same files), then by request id (a line may show in both .out and .err)."""
    out: dict[str, dict[str, tuple]] = {}
    for path in logs.glob("worker-*"):
        for rid, *rest in DONE.findall(path.read_text(errors="replace")):
            out.setdefault(path.stem, {})[rid] = tuple(rest)
    return out


def _count(lines: dict[str, dict[str, tuple]]) -> int:
    return sum(map(len, lines.values()))


def _wait_for_lines(logs: Path, count: int, timeout: float = 60) -> dict[str, dict[str, tuple]]:
    deadline = time.monotonic() + timeout
    while True:  # Ray flushes worker output to its files asynchronously
        lines = _done_lines(logs)
        if _count(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(1)


def test_one_then_two_replicas_evict_and_match_vllm_serve(tiny_model, cluster, reference):
    seconds = _deploy(tiny_model, replicas=1)
    print(f"\nRay Serve LLM, 1 replica: healthy after {seconds:.1f} s")
    got = asyncio.run(_complete(cluster["url"], MODEL_ID, REQUESTS))
    assert got == reference  # same greedy text and token ids as plain vllm serve

    lines = _wait_for_lines(cluster["logs"], len(REQUESTS))
    found = [line for per_request in lines.values() for line in per_request.values()]
    assert len(found) == len(REQUESTS), lines
    assert sorted(int(line[1]) for line in found) == [REQUEST_BUDGET, BUDGET]  # default, xargs
    for policy, budget, _logical, _kept, evicted, pages in found:
        cfg = EvictionConfig(policy=policy, budget=int(budget), window=WINDOW, slack=SLACK)
        assert policy == "streaming" and int(pages) > 0
        assert int(evicted) == expected_eviction(cfg, PROMPT_LEN, MAX_TOKENS)[1] > 0

    seconds = _deploy(tiny_model, replicas=2)
    print(f"Ray Serve LLM, 2 replicas: scaled up after {seconds:.1f} s")
    before = _done_lines(cluster["logs"])
    batch = [_request(10 + i, PER_REQUEST if i % 2 else None) for i in range(8)]
    outs = asyncio.run(_complete(cluster["url"], MODEL_ID, batch))
    assert all(len(tokens or []) == MAX_TOKENS for _, tokens in outs)
    after = _wait_for_lines(cluster["logs"], _count(before) + len(batch))
    new = {worker: len(rids.keys() - before.get(worker, {}).keys())
           for worker, rids in after.items()}
    assert sum(new.values()) == len(batch), new
    assert len([w for w, n in new.items() if n > 0]) == 2, \
        f"both replicas should serve and evict; new lines per worker: {new}"
