"""`vllm serve` flags and config errors: listed in --help, folded into additional_config, and
every bad value stops vLLM before an engine starts, naming the field and what is allowed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VLLM = str(Path(sys.executable).with_name("vllm"))


def _vllm(*args: str) -> subprocess.Popen:
    return subprocess.Popen([VLLM, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ))


def test_help_lists_the_flags_and_policies():
    out, _ = _vllm("serve", "--help=all").communicate(timeout=120)
    for flag in ("--kv-eviction", "--kv-budget", "--kv-sink-tokens", "--kv-window", "--kv-slack"):
        assert flag in out
    text = " ".join(out.split())  # argparse wraps the policy list wherever the lengths fall
    assert "streaming: attention sinks" in text and "none: keep every token" in text


BAD_FLAGS = [
    (["--kv-eviction", "bogus"], "invalid choice: 'bogus' (choose from 'none', "),
    (["--kv-eviction", "streaming", "--kv-budget", "20"],
     "kv_eviction: budget must be > sink_tokens + window = 4 + 32 = 36; got budget=20"),
    (["--kv-budget", "-5"], "kv_eviction.budget: must be an integer > 0; got -5"),
    (["--kv-budget", "1.5"], "argument --kv-budget: invalid int value: '1.5'"),
    (["--additional-config", json.dumps({"kv_eviction": {"policy": "lru"}})],
     "kv_eviction.policy: unknown policy 'lru'; allowed: none, "),
    (["--kv-eviction", "h2o", "--kv-cache-dtype", "fp8"],
     "kv_eviction does not support --kv-cache-dtype fp8: scoring and compaction read K and V "
     "without dequantisation scales; allowed: auto, bfloat16, "),
]


def test_bad_flags_fail_before_the_engine_starts(tiny_model):
    procs = [(_vllm("serve", tiny_model, "--enforce-eager", *flags), needle)
             for flags, needle in BAD_FLAGS]
    for proc, needle in procs:  # all at once: each is mostly vLLM's import time
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode != 0, out[-2000:]
        assert needle in out, out[-2000:]
        assert "EngineCore" not in out, "an engine was started for a bad config"


def test_flags_fold_over_additional_config_and_select_our_classes(tiny_model):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_evict
    from vllm_evict.host import cli

    vllm_evict.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", tiny_model, "--kv-eviction", "streaming",
                              "--kv-budget", "512", "--additional-config",
                              json.dumps({"kv_eviction": {"slack": 7, "budget": 99}, "x": 1})])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {
        "x": 1, "kv_eviction": {"slack": 7, "budget": 512, "policy": "streaming"}}
    config = engine_args.create_engine_config()
    assert config.scheduler_config.scheduler_cls == cli.SCHEDULER_CLS
    assert config.parallel_config.worker_cls == cli.CPU_WORKER_CLS
    assert config.additional_config["kv_eviction"]["window"] == 32  # defaults filled in


def test_without_eviction_config_vllm_is_untouched(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=tiny_model).create_engine_config()
    assert "vllm_evict" not in str(config.scheduler_config.scheduler_cls)
    assert "vllm_evict" not in config.parallel_config.worker_cls


@pytest.mark.parametrize("given, enforce_eager, wanted", [
    (None, False, "PIECEWISE"),  # vLLM's default on GPU would be FULL_AND_PIECEWISE
    ("FULL_AND_PIECEWISE", False, "PIECEWISE"),
    ("FULL", False, "PIECEWISE"),
    ("FULL_DECODE_ONLY", False, "NONE"),
    ("PIECEWISE", False, "PIECEWISE"),
    ("NONE", False, "NONE"),
    ("FULL", True, "FULL"),  # enforce_eager: vLLM captures nothing anyway
])
def test_gpu_engines_keep_attention_out_of_cuda_graphs(tiny_model, given, enforce_eager, wanted):
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_evict.host.cli import keep_attention_out_of_cuda_graphs

    compilation = {} if given is None else {"cudagraph_mode": given}
    engine_args = EngineArgs(model=tiny_model, compilation_config=compilation,
                             enforce_eager=enforce_eager)
    keep_attention_out_of_cuda_graphs(engine_args)
    assert engine_args.compilation_config.cudagraph_mode == CUDAGraphMode[wanted]


def test_offline_bad_config_raises_before_the_engine(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_evict.core.config import EvictionConfigError

    with pytest.raises(EvictionConfigError, match=r"kv_eviction.window: must be an integer >= 0"):
        EngineArgs(model=tiny_model, additional_config={"kv_eviction": {"window": -1}}
                   ).create_engine_config()


FLAG_VALUES = st.one_of(st.integers(-5, 5000).map(str), st.sampled_from(
    ["none", "streaming", "h2o", "snapkv", "bogus", "", "1.5", "allow", "deny", "h2o,tova",
     "h2o,,x", "nan", "-0", "2048"]), st.text(max_size=8))
FLAGS = st.dictionaries(st.sampled_from(
    ["--kv-eviction", "--kv-budget", "--kv-sink-tokens", "--kv-window", "--kv-slack",
     "--kv-request-override", "--kv-allowed-policies", "--kv-budget-min", "--kv-budget-max"]),
    FLAG_VALUES, max_size=4)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=FLAGS)
def test_fuzzed_flags_give_a_clear_error_or_a_valid_config(tiny_model, flags):
    """Any flag combination either stops with a message naming the flag or field, or yields a
    config that validates (the same code path `vllm serve` runs, minus the engine)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_evict
    from vllm_evict.core.config import EvictionConfig

    vllm_evict.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(exit_on_error=False))
    argv = ["--model", tiny_model, *(f"{flag}={value}" for flag, value in flags.items())]
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as exc:  # a malformed value: argparse names the flag
        assert any(f in str(exc) for f in flags), exc
        return
    except SystemExit as exc:  # argparse's own usage error
        assert exc.code == 2
        return
    try:
        engine_args = AsyncEngineArgs.from_cli_args(args)
    except SystemExit as exc:
        assert str(exc).startswith("vllm serve: error: kv_eviction"), exc
        return
    section = (engine_args.additional_config or {}).get("kv_eviction")
    assert (section is None) == (not flags)
    if section is not None:
        EvictionConfig.parse(section)  # valid by construction
