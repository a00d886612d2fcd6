"""Workers whose model runner carries the eviction hooks (selected by vllm_evict.host.cli)."""

from __future__ import annotations

import functools

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_evict.host.patching import extends
from vllm_evict.host.runner import EvictionRunnerMixin


@functools.cache
def _with_eviction(runner_cls: type) -> type:
    return type(f"Eviction{runner_cls.__name__}", (EvictionRunnerMixin, runner_cls), {})


def attach_eviction(worker) -> None:
    """Give the worker's freshly built V1 runner the eviction hooks.

    The workers build their runner inside init_device from a hard-wired class, so we re-class
    the instance to a subclass that only adds methods (no new slots, same state).
    """
    runner = worker.model_runner
    if not isinstance(runner, GPUModelRunner):
        raise NotImplementedError(
            f"vllm-evict hooks vLLM's V1 model runner; this engine uses {type(runner).__name__} "
            "(Model Runner V2). Set VLLM_USE_V2_MODEL_RUNNER=0.")
    from vllm_evict.host.patching import record

    runner.__class__ = _with_eviction(type(runner))
    record(f"{type(runner).__mro__[2].__module__}.{type(runner).__mro__[2].__qualname__}",
           "re-class", "the worker's V1 runner gets the eviction hooks (EvictionRunnerMixin)")
    runner.init_eviction(rank=worker.rank)


@extends(why="register the CPU statistics backend, then give the runner the hooks")
class EvictionCPUWorker(CPUWorker):
    def init_device(self):
        from vllm_evict.host.attention import cpu

        cpu.register()  # before the model (and its attention layers) is built
        super().init_device()
        attach_eviction(self)


@extends(why="register the GPU statistics backends, then give the runner the hooks")
class EvictionGPUWorker(Worker):
    def init_device(self):
        from vllm_evict.host.attention import gpu

        gpu.register()  # FLASH_ATTN and TRITON_ATTN with the Triton statistics after them
        super().init_device()
        attach_eviction(self)
