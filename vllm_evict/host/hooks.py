"""Hooks into vLLM classes that have no registry: the KV cache spec of attention layers."""

from __future__ import annotations

from vllm_evict.core.config import EvictionConfig


def _install_kv_spec() -> None:
    """Layers of an engine with eviction emit EvictableAttentionSpec; its manager is registered
    through the platform hook that runs after vLLM's built-in specs (registering at import
    time would make vLLM skip its built-ins)."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_evict.host.patching import patch

    def wrap_register(original):
        def register_custom_kv_cache_specs(cls, vllm_config):
            original(cls, vllm_config)
            from vllm_evict.host.kv_cache import register_spec

            register_spec()
        return register_custom_kv_cache_specs

    def wrap_spec(original):
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            if type(spec) is FullAttentionSpec and EvictionConfig.from_additional_config(
                    vllm_config.additional_config) is not None:
                from vllm_evict.host.kv_cache import EvictableAttentionSpec

                spec = EvictableAttentionSpec.from_full(spec)
            return spec
        return get_kv_cache_spec

    patch(type(current_platform), "register_custom_kv_cache_specs", wrap_register,
          why="register EvictableAttentionSpec and its manager after vLLM's built-in specs")
    patch(Attention, "get_kv_cache_spec", wrap_spec,
          why="full-attention layers of an engine with eviction emit EvictableAttentionSpec")


def install() -> None:
    _install_kv_spec()
