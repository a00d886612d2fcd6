"""Engine-argument integration: `vllm serve` flags, and the one place the engine config is set.

`--kv-eviction`, `--kv-budget`, ... are added to vLLM's own argument parser (they show in
`vllm serve --help`) and folded into `additional_config["kv_eviction"]`, which is also where
`--additional-config` and `LLM(additional_config=...)` put them. `create_engine_config` then
validates that block once, before any engine process starts, and selects the plugin's
scheduler and worker classes for this engine only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from vllm_evict.core.config import ADDITIONAL_CONFIG_KEY, EvictionConfig, EvictionConfigError

logger = logging.getLogger("vllm.evict")

SCHEDULER_CLS = "vllm_evict.host.scheduler.EvictionScheduler"
CPU_WORKER_CLS = "vllm_evict.host.worker.EvictionCPUWorker"
GPU_WORKER_CLS = "vllm_evict.host.worker.EvictionGPUWorker"
# KV cache dtypes the statistics and compaction can read as they are.
UNQUANTIZED_KV_CACHE_DTYPES = frozenset({"auto", "float16", "half", "bfloat16", "float32",
                                         "float"})

# flag -> EvictionConfig field
_FLAGS: dict[str, str] = {
    "kv_eviction": "policy",
    "kv_budget": "budget",
    "kv_sink_tokens": "sink_tokens",
    "kv_window": "window",
    "kv_slack": "slack",
    "kv_request_override": "request_override",
    "kv_allowed_policies": "allowed_policies",
    "kv_budget_min": "budget_min",
    "kv_budget_max": "budget_max",
    "kv_policy_args": "policy_args",
    "kv_prefill_eviction": "prefill_eviction",
    "kv_prefill_chunk": "prefill_chunk",
}


def add_eviction_args(parser: argparse.ArgumentParser) -> None:
    from vllm_evict.core.policies import policy_summaries

    summaries = policy_summaries()
    defaults = EvictionConfig()
    listing = "; ".join(f"{name}: {text}" for name, text in summaries.items())
    group = parser.add_argument_group(
        "KV eviction (vllm-evict)",
        "Keep at most --kv-budget KV entries per request, layer and KV head; evicted pages go "
        "back to the pool. Clients may override per request with "
        'vllm_xargs {"kv_eviction": NAME, "kv_budget": N}.',
    )
    group.add_argument(
        "--kv-eviction",
        choices=list(summaries),
        default=argparse.SUPPRESS,
        metavar="POLICY",
        help=f"Eviction policy for requests that do not choose one. Policies: {listing}.",
    )
    group.add_argument("--kv-budget", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"KV entries kept per (layer, KV head). Default {defaults.budget}.")
    group.add_argument("--kv-sink-tokens", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"First tokens always kept. Default {defaults.sink_tokens}.")
    group.add_argument("--kv-window", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"Most recent tokens always kept. Default {defaults.window}.")
    group.add_argument("--kv-slack", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="Tokens a request may grow past the budget before it is compacted "
                       f"back. Default {defaults.slack}.")
    group.add_argument("--kv-request-override", choices=["allow", "deny"], default=argparse.SUPPRESS,
                       help="Whether requests may choose kv_eviction / kv_budget in vllm_xargs. "
                       "Default allow.")
    group.add_argument("--kv-allowed-policies", default=argparse.SUPPRESS, metavar="P1,P2",
                       help="Policies requests may choose (comma-separated; none is always "
                       "allowed). Default: every policy.")
    group.add_argument("--kv-budget-min", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="Smallest budget a request may ask for. Default sinks + window + 1.")
    group.add_argument("--kv-budget-max", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="Largest budget a request may ask for. Default: no limit.")
    group.add_argument("--kv-prefill-eviction", action="store_true", default=argparse.SUPPRESS,
                       help="Compact during prefill too, every --kv-prefill-chunk prompt tokens "
                       "once past budget + slack, so a request never holds more than about "
                       "budget + slack + chunk entries however long its prompt. Choose it for "
                       "prompts near or beyond the KV pool; without it compaction starts after "
                       "the prompt, and a request's peak is its prompt. With "
                       "--kv-request-override deny it also lets the server start with a pool "
                       "smaller than one --max-model-len. A request is admitted only where "
                       "its bound fits beside those of the running ones, so evicting requests "
                       "never preempt one another. Requests compacted inside their "
                       "prompt skip the prefix cache. The context is then compacted before "
                       "the question at its end is read, so prefer a query-agnostic policy "
                       "(keydiff) over tova or snapkv. Off by default.")
    group.add_argument("--kv-prefill-chunk", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="With --kv-prefill-eviction: prefill stops and compacts at every "
                       f"multiple of N past the cap. Default {defaults.prefill_chunk}.")
    group.add_argument("--kv-policy-args", default=argparse.SUPPRESS, metavar="JSON",
                       help="Per-policy parameters, applied to every request that runs the "
                       'policy, e.g. \'{"snapkv": {"observation_window": 64}, "pyramidkv": '
                       '{"beta": 10}}\'. Parameters: snapkv/pyramidkv observation_window, '
                       "pool_kernel; pyramidkv beta; random seed. Requests cannot set them.")


def fold_flags(args: argparse.Namespace, additional_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Merge the --kv-* flags given on the command line over additional_config["kv_eviction"]."""
    given = {field: getattr(args, flag) for flag, field in _FLAGS.items()
             if getattr(args, flag, None) is not None}
    if not given:
        return additional_config
    merged = dict(additional_config or {})
    section = merged.get(ADDITIONAL_CONFIG_KEY) or {}
    if isinstance(section, str):
        section = {"policy": section}
    merged[ADDITIONAL_CONFIG_KEY] = {**section, **given}
    return merged


def configure_engine(engine_args: Any) -> EvictionConfig | None:
    """Validate the eviction config and select the plugin's classes. Runs before engines start."""
    cfg = EvictionConfig.from_additional_config(engine_args.additional_config)
    if cfg is None:
        return None
    engine_args.additional_config = {**engine_args.additional_config,
                                     ADDITIONAL_CONFIG_KEY: cfg.model_dump(mode="json")}

    from vllm.platforms import current_platform

    if engine_args.scheduler_cls not in (None, SCHEDULER_CLS):
        raise EvictionConfigError(
            f"kv_eviction needs scheduler_cls={SCHEDULER_CLS}; got {engine_args.scheduler_cls!r}. "
            "Remove --scheduler-cls or drop the eviction config."
        )
    engine_args.scheduler_cls = SCHEDULER_CLS
    worker_cls = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
    if engine_args.worker_cls not in ("auto", worker_cls):
        raise EvictionConfigError(
            f"kv_eviction needs worker_cls={worker_cls}; got {engine_args.worker_cls!r}. "
            "Remove --worker-cls or drop the eviction config."
        )
    engine_args.worker_cls = worker_cls
    if engine_args.kv_cache_dtype not in UNQUANTIZED_KV_CACHE_DTYPES:
        raise EvictionConfigError(
            f"kv_eviction does not support --kv-cache-dtype {engine_args.kv_cache_dtype}: scoring "
            "and compaction read K and V without dequantisation scales; allowed: "
            f"{', '.join(sorted(UNQUANTIZED_KV_CACHE_DTYPES))}")
    from vllm_evict.host import support

    support.prepare_engine_args(engine_args, current_platform.is_cpu())
    if not current_platform.is_cpu():
        if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
            # The data path hooks the V1 model runner (see docs/architecture.md). Set before
            # the worker processes are spawned, so they inherit it.
            from vllm_evict.host.patching import record

            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            record("VLLM_USE_V2_MODEL_RUNNER=0", "environment",
                   "the data path hooks the V1 model runner")
        keep_attention_out_of_cuda_graphs(engine_args)
    return cfg


def keep_attention_out_of_cuda_graphs(engine_args: Any) -> None:
    """The GPU statistics run after each layer's attention (attention/gpu.py); piecewise CUDA
    graphs run attention eagerly between the captured pieces, full graphs would replay a
    capture of it. So full-graph modes become PIECEWISE (FULL_DECODE_ONLY: NONE)."""
    from vllm.config import CompilationConfig, CUDAGraphMode

    config = engine_args.compilation_config
    if isinstance(config, dict):
        config = engine_args.compilation_config = CompilationConfig(**config)
    mode = config.cudagraph_mode  # CompilationConfig has turned a given string into the enum
    if engine_args.enforce_eager or mode == CUDAGraphMode.NONE:
        return
    wanted = CUDAGraphMode.NONE if mode == CUDAGraphMode.FULL_DECODE_ONLY else \
        CUDAGraphMode.PIECEWISE
    if mode != wanted:
        logger.info("vllm-evict: CUDA graph mode %s instead of %s, so attention (and the "
                    "eviction statistics after it) runs outside captured graphs",
                    wanted.name, mode.name if mode is not None else "the default")
        config.cudagraph_mode = wanted


def install() -> None:
    """Wrap EngineArgs.add_cli_args / from_cli_args / create_engine_config. Idempotent."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_evict.host.patching import patch

    def wrap_add(original):
        def add_cli_args(parser):
            parser = original(parser)
            add_eviction_args(parser)
            return parser
        return add_cli_args

    def wrap_from(original):
        def from_cli_args(cls, args: argparse.Namespace):
            engine_args = original(cls, args)
            engine_args.additional_config = fold_flags(args, engine_args.additional_config)
            try:  # fail like argparse does, before any engine process starts
                cfg = EvictionConfig.from_additional_config(engine_args.additional_config)
            except EvictionConfigError as exc:
                sys.exit(f"vllm serve: error: {exc}")
            engine_args._vllm_evict_from_cli = True
            if cfg is not None and hasattr(args, "port"):  # `vllm serve` (the frontend adds --port)
                from vllm_evict.host.metrics import enable_multiprocess_collection

                enable_multiprocess_collection()
            return engine_args
        return from_cli_args

    def wrap_create(original):
        def create_engine_config(self, *args, **kwargs):
            from vllm_evict.host import support

            try:
                cfg = configure_engine(self)
                vllm_config = original(self, *args, **kwargs)
                if cfg is not None:
                    support.check_engine_config(vllm_config)
            except EvictionConfigError as exc:
                if getattr(self, "_vllm_evict_from_cli", False):
                    sys.exit(f"vllm serve: error: {exc}")  # like argparse: no traceback
                raise
            if cfg is not None:
                from vllm_evict.host.patching import installed

                logger.info("vllm-evict enabled: %s (%d vLLM hooks; `python -m vllm_evict "
                            "--doctor` lists them)", cfg.describe(), len(installed()))
            return vllm_config
        return create_engine_config

    patch(EngineArgs, "add_cli_args", wrap_add, why="add the --kv-* flags to vllm serve")
    patch(EngineArgs, "from_cli_args", wrap_from,
          why="fold --kv-* into additional_config; bad values exit before any engine")
    patch(EngineArgs, "create_engine_config", wrap_create,
          why="validate once, select the plugin's scheduler and worker, refuse what "
              "eviction cannot serve")
