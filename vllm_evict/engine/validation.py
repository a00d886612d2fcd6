"""Per-request validation, in the API server and LLM(): a bad `vllm_xargs` value is an HTTP 400
for that request only (vLLM maps VLLMValidationError to 400) and never reaches the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_evict.config import REQUEST_KEYS, EvictionConfig, EvictionConfigError


def check_request(additional_config: Mapping[str, Any] | None,
                  extra_args: Mapping[str, Any] | None) -> EvictionConfig | None:
    """The request's resolved config (None: plugin off); raise EvictionConfigError if invalid."""
    server = EvictionConfig.from_additional_config(additional_config)
    if server is None:
        asked = sorted(k for k in (extra_args or {}) if k in REQUEST_KEYS)
        if asked:
            raise EvictionConfigError(
                f"vllm_xargs {asked}: KV eviction is not enabled on this server; the operator "
                "must start it with --kv-eviction POLICY (or --kv-eviction none to let requests "
                "choose)"
            )
        return None
    return server.for_request(extra_args)


STREAMING_INPUT_REFUSED = (
    "streaming-input (resumable) requests cannot use KV eviction: each input chunk restarts the "
    "request on both the scheduler and the workers, which would forget what was compacted. "
    "Send vllm_xargs {\"kv_eviction\": \"none\"} with them, or start the server without "
    "--kv-eviction")


def check_streaming_input(additional_config: Mapping[str, Any] | None,
                          extra_args: Mapping[str, Any] | None) -> None:
    """Raise EvictionConfigError if a resumable request would evict."""
    cfg = check_request(additional_config, extra_args)
    if cfg is not None and cfg.evicts:
        raise EvictionConfigError(STREAMING_INPUT_REFUSED + f" (this request: {cfg.describe()})")


def install() -> None:
    """Wrap InputProcessor._validate_params and process_inputs. Idempotent."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_vllm_evict_installed", False):
        return
    original = InputProcessor._validate_params

    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        if isinstance(params, SamplingParams) and params.extra_args:
            try:
                check_request(self.vllm_config.additional_config, params.extra_args)
            except EvictionConfigError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return result

    original_process = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, resumable: bool = False, **kwargs):
        if resumable and isinstance(params, SamplingParams):
            try:
                check_streaming_input(self.vllm_config.additional_config, params.extra_args)
            except EvictionConfigError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return original_process(self, request_id, prompt, params, *args, resumable=resumable,
                                **kwargs)

    InputProcessor._validate_params = _validate_params
    InputProcessor.process_inputs = process_inputs
    InputProcessor._vllm_evict_installed = True
