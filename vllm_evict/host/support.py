"""Every vLLM set-up an engine with eviction cannot serve, refused when the engine starts.

Two moments, both before `vllm serve` reports healthy and before `LLM()` returns:
  * `prepare_engine_args` (before vLLM validates the config) and `check_engine_config` (after
    it resolved it) run in the process that builds the engine config (the API server, or the
    `LLM()` caller): features chosen by flags.
  * `check_kv_cache_groups`, `check_layer_caches` and `check_backends` run in each worker once
    its KV cache exists (host/runner.py): what the model's layers turned out to be.

Each message names the feature, the flag that turns it off, and why eviction cannot run with
it. The data-path rule behind all of them: the scheduler and the workers compute a request's
physical length from the same pure formula, one block table per request, and compaction owns
every page it rewrites (docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from vllm_evict.core.config import EvictionConfigError

logger = logging.getLogger("vllm.evict")

# GPU attention backends that have an eviction wrapper (attention/gpu.py).
GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


class UnsupportedSetupError(EvictionConfigError):
    """A vLLM feature or model shape that KV eviction cannot serve."""


def _refuse(feature: str, how_to_turn_off: str, why: str) -> UnsupportedSetupError:
    return UnsupportedSetupError(
        f"kv_eviction does not support {feature}: {why}. To serve this model with eviction, "
        f"{how_to_turn_off}; or drop --kv-eviction / additional_config.kv_eviction.")


def _refuse_async_scheduling() -> UnsupportedSetupError:
    return _refuse(
        "async scheduling (--async-scheduling)", "remove --async-scheduling",
        "the scheduler frees pages for c - in-flight tokens while the workers compact for "
        "c, so the two sides would disagree on a request's physical length")


def _refuse_kv_connectors() -> UnsupportedSetupError:
    return _refuse(
        "KV connectors (--kv-transfer-config: LMCache, NIXL, disaggregated prefill, ...)",
        "remove --kv-transfer-config",
        "connectors load and save pages by block id, and compaction rewrites those pages")


def prepare_engine_args(engine_args: Any, is_cpu: bool) -> None:
    """Before vLLM validates the config (so these messages come before any of vLLM's): the
    features eviction refuses, by the flag that chose them, and the choices it makes."""
    if engine_args.async_scheduling:
        raise _refuse_async_scheduling()
    if engine_args.pipeline_parallel_size > 1:
        raise _refuse(
            f"pipeline parallelism (--pipeline-parallel-size {engine_args.pipeline_parallel_size})",
            "use --pipeline-parallel-size 1 (tensor parallelism is supported)",
            "its batch queue keeps several steps in flight, so the scheduler's computed-token "
            "count runs ahead of the workers'")
    for name, flag in (("decode_context_parallel_size", "--decode-context-parallel-size"),
                       ("prefill_context_parallel_size", "--prefill-context-parallel-size")):
        size = getattr(engine_args, name, 1) or 1
        if size > 1:
            raise _refuse(f"context parallelism ({flag} {size})", f"use {flag} 1",
                          "it splits a request's pages across ranks, so scheduler and worker "
                          "page sizes differ")
    if getattr(engine_args, "kv_offloading_size", None):
        raise _refuse("KV offloading (--kv-offloading-size)", "remove --kv-offloading-size",
                      "offloaded pages would be restored after compaction rewrote them")
    if engine_args.kv_transfer_config is not None:
        raise _refuse_kv_connectors()
    if getattr(engine_args, "kv_sharing_fast_prefill", False):
        raise _refuse("--kv-sharing-fast-prefill", "remove --kv-sharing-fast-prefill",
                      "it skips the prefill of layers whose cache another layer owns")
    backend = engine_args.attention_backend
    name = getattr(backend, "name", backend)
    if not is_cpu and name is not None and name not in GPU_BACKENDS:
        raise _refuse(
            f"the {name} attention backend (--attention-backend {name})",
            f"pass --attention-backend {' or '.join(GPU_BACKENDS)}",
            "the score policies' statistics are measured only by the FLASH_ATTN and TRITON_ATTN "
            "wrappers")
    if engine_args.async_scheduling is None:
        # vLLM's default turns it on for CUDA; eviction needs it off (see above).
        engine_args.async_scheduling = False
        if not is_cpu:
            logger.info("vllm-evict: async scheduling off for this engine (eviction needs the "
                        "scheduler and workers to agree on each step's computed tokens)")


def check_engine_config(vllm_config: Any) -> None:
    """After vLLM resolved the config: what other paths (config files, defaults) may have
    turned on after prepare_engine_args looked."""
    if vllm_config.scheduler_config.async_scheduling:
        raise _refuse_async_scheduling()
    if vllm_config.kv_transfer_config is not None:
        raise _refuse_kv_connectors()


def check_kv_cache_groups(spec_names: Sequence[str], evictable: Sequence[bool]) -> None:
    """One KV cache group, of full attention without a window: hybrid models are refused."""
    if len(spec_names) == 1 and evictable[0]:
        return
    kinds = ", ".join(spec_names)
    raise _refuse(
        f"this model's KV cache layout ({len(spec_names)} KV cache group(s): {kinds})",
        "serve a model whose layers are all full attention (no sliding-window, chunked-local, "
        "Mamba or MLA layers)",
        "eviction keeps one physical length per request for every layer; sliding-window and "
        "state layers would apply their window to physical positions. "
        "--disable-hybrid-kv-cache-manager does not help: it keeps the windowed layers")


def check_layer_caches(shapes: Sequence[tuple[int, ...]], data_ptrs: Sequence[int],
                       shared_layers: Iterable[str]) -> None:
    """Every layer owns its cache, and all layers have the same KV heads and head size."""
    shared = sorted(shared_layers)
    if shared or len(set(data_ptrs)) != len(data_ptrs):
        raise _refuse(
            f"cross-layer KV sharing (layers {', '.join(shared) or 'with one cache tensor'})",
            "serve a model without kv_sharing_target_layer_name layers",
            "compaction would rewrite a shared cache once per layer that reads it")
    per_layer = {tuple(shape[1:]) for shape in shapes}
    if len(per_layer) > 1:
        raise _refuse(
            f"KV caches whose shape differs per layer ({sorted(per_layer)})",
            "serve a model with the same KV heads and head size in every layer",
            "one kept-position table per request covers every layer with the same heads")


def check_backends(unsupported: dict[str, str]) -> None:
    """`unsupported`: layer name -> attention implementation without an eviction wrapper.
    Such layers would give the score policies no statistics."""
    if unsupported:
        impls = ", ".join(sorted(set(unsupported.values())))
        raise _refuse(
            f"the attention implementation(s) {impls} (layers {', '.join(sorted(unsupported))})",
            f"pass --attention-backend {' or '.join(GPU_BACKENDS)} (GPU)",
            "only the CPU_ATTN, FLASH_ATTN and TRITON_ATTN wrappers measure the statistics and "
            "know the cache layout")
