"""vllm-evict: KV-cache eviction for vLLM's paged attention, as a general plugin.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in the API server, the
engine core and every worker process; it only installs hooks, each of them idempotent, and
does nothing for an engine whose config has no `kv_eviction` section.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_evict import cli
    from vllm_evict.engine import hooks

    cli.install()
    hooks.install()
    _registered = True
