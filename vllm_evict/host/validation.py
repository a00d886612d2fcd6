"""Per-request validation, in the API server and LLM(): a bad `vllm_xargs` value is an HTTP 400
for that request only (vLLM maps VLLMValidationError to 400) and never reaches the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_evict.core.config import EvictionConfigError, resolve_request

STREAMING_INPUT_REFUSED = (
    "streaming-input (resumable) requests cannot use KV eviction: each input chunk restarts the "
    "request on both the scheduler and the workers, which would forget what was compacted. "
    "Send vllm_xargs {\"kv_eviction\": \"none\"} with them, or start the server without "
    "--kv-eviction")


def check_streaming_input(additional_config: Mapping[str, Any] | None,
                          extra_args: Mapping[str, Any] | None) -> None:
    """Raise EvictionConfigError if a resumable request would evict."""
    cfg = resolve_request(additional_config, extra_args)
    if cfg is not None and cfg.evicts:
        raise EvictionConfigError(STREAMING_INPUT_REFUSED + f" (this request: {cfg.describe()})")


def install() -> None:
    """Wrap InputProcessor._validate_params and process_inputs. Idempotent."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_evict.host.patching import patch

    def wrap_validate(original):
        def _validate_params(self, params, supported_tasks):
            result = original(self, params, supported_tasks)
            if isinstance(params, SamplingParams) and params.extra_args:
                try:
                    resolve_request(self.vllm_config.additional_config, params.extra_args)
                except EvictionConfigError as exc:
                    raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
            return result
        return _validate_params

    def wrap_process(original):
        def process_inputs(self, request_id, prompt, params, *args, resumable: bool = False,
                           **kwargs):
            if resumable and isinstance(params, SamplingParams):
                try:
                    check_streaming_input(self.vllm_config.additional_config, params.extra_args)
                except EvictionConfigError as exc:
                    raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
            return original(self, request_id, prompt, params, *args, resumable=resumable,
                            **kwargs)
        return process_inputs

    patch(InputProcessor, "_validate_params", wrap_validate,
          why="a bad vllm_xargs is a 400 for that request only")
    patch(InputProcessor, "process_inputs", wrap_process,
          why="refuse streaming-input requests that would evict")
