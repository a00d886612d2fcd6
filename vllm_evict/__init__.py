"""vllm-evict: KV-cache eviction for vLLM's paged attention, as a general plugin.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in the API server, the
engine core and every worker process; it only installs hooks, each of them idempotent, and
does nothing for an engine whose config has no `kv_eviction` section.

Layout: `vllm_evict.core` never imports vLLM (config, policies, state, observation plan,
dump, oracle); `vllm_evict.host` is the one adapter that does; `vllm_evict.kernels` is
vLLM-free too. See docs/architecture.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Refuse a vLLM this plugin was not written for, then install the adapter's hooks."""
    global _registered
    if _registered:
        return
    from vllm_evict.host import plugin

    plugin.register()
    _registered = True
