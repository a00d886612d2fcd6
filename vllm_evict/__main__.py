"""`python -m vllm_evict --doctor`: the vLLM version and every vLLM symbol the plugin touches.
`python -m vllm_evict --check [--kv-* FLAGS] [--additional-config JSON]`: validate an eviction
config exactly as `vllm serve` would, without vLLM (deploy/docker/entrypoint.sh runs it first)."""

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


def check(argv: list[str]) -> int:
    """Parse the --kv-* flags with the plugin's own parser, fold them over --additional-config
    and validate; print the config, or the plugin's error (exit 2, like argparse)."""
    import json

    from vllm_evict.core.config import EvictionConfig, EvictionConfigError
    from vllm_evict.host.cli import add_eviction_args, fold_flags

    parser = argparse.ArgumentParser(prog="python -m vllm_evict --check")
    parser.add_argument("--additional-config", default=None, metavar="JSON")
    add_eviction_args(parser)
    args = parser.parse_args(argv)  # a bad flag value exits 2 with argparse's message
    try:
        additional = json.loads(args.additional_config) if args.additional_config else None
        if additional is not None and not isinstance(additional, dict):
            raise EvictionConfigError(f"--additional-config: expected a JSON object; got {additional!r}")
        cfg = EvictionConfig.from_additional_config(fold_flags(args, additional))
    except json.JSONDecodeError as exc:
        print(f"vllm-evict: error: --additional-config is not JSON: {exc}", file=sys.stderr)
        return 2
    except EvictionConfigError as exc:
        print(f"vllm-evict: error: {exc}", file=sys.stderr)
        return 2
    print(f"vllm-evict: {cfg.describe()}" if cfg else "vllm-evict: eviction not configured")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"]:  # the rest are `vllm serve`'s eviction flags
        return check(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m vllm_evict")
    parser.add_argument("--doctor", action="store_true",
                        help="list what the plugin installs into vLLM, and check the version")
    parser.add_argument("--check", action="store_true",
                        help="validate the --kv-* / --additional-config flags that follow, "
                        "as vllm serve would, without starting vLLM; exit 2 on a bad value")
    args = parser.parse_args(argv)
    if args.doctor:
        return doctor()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
