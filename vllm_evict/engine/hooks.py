"""Hooks into vLLM classes that have no registry: request validation and the KV cache spec."""

from __future__ import annotations

from vllm_evict.config import EvictionConfig
from vllm_evict.engine import validation


def _install_kv_spec() -> None:
    """Layers of an engine with eviction emit EvictableAttentionSpec; its manager is registered
    through the platform hook that runs after vLLM's built-in specs (registering at import
    time would make vLLM skip its built-ins)."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_vllm_evict_installed", False):
        return
    original_register = platform_cls.register_custom_kv_cache_specs.__func__

    def register_custom_kv_cache_specs(cls, vllm_config):
        original_register(cls, vllm_config)
        from vllm_evict.engine.kv_cache import register_spec

        register_spec()

    original_spec = Attention.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = original_spec(self, vllm_config)
        if type(spec) is FullAttentionSpec and EvictionConfig.from_additional_config(
                vllm_config.additional_config) is not None:
            from vllm_evict.engine.kv_cache import EvictableAttentionSpec

            spec = EvictableAttentionSpec.from_full(spec)
        return spec

    platform_cls.register_custom_kv_cache_specs = classmethod(register_custom_kv_cache_specs)
    Attention.get_kv_cache_spec = get_kv_cache_spec
    platform_cls._vllm_evict_installed = True


def install() -> None:
    validation.install()
    _install_kv_spec()
