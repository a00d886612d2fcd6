"""`python -m vllm_evict --doctor`: the vLLM version and every vLLM symbol the plugin touches."""

from __future__ import annotations

import argparse
import sys


def doctor() -> int:
    from vllm.platforms import current_platform

    import vllm_evict
    from vllm_evict.host import patching

    try:
        vllm_evict.register()
    except patching.UnsupportedVllmError as exc:
        print(f"vllm-evict {vllm_evict.__version__}: {exc}")
        return 1
    # Modules whose classes extend vLLM's; importing them records those subclasses.
    from vllm_evict.host import kv_cache, scheduler, worker  # noqa: F401

    if current_platform.is_cpu():
        from vllm_evict.host.attention import cpu as backends
    else:
        from vllm_evict.host.attention import gpu as backends
    backends.register()
    print(f"vllm-evict {vllm_evict.__version__} on {type(current_platform).__name__}")
    print(patching.describe())
    print("In each worker, the V1 model runner is also re-classed to add EvictionRunnerMixin.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_evict")
    parser.add_argument("--doctor", action="store_true",
                        help="list what the plugin installs into vLLM, and check the version")
    args = parser.parse_args(argv)
    if args.doctor:
        return doctor()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
