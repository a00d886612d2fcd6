"""Plugin registration: what `vllm_evict.register()` installs in every vLLM process."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.evict")


def register() -> None:
    from vllm_evict.host import cli, hooks, patching, validation

    patching.check_vllm_version()
    cli.install()
    validation.install()
    hooks.install()
