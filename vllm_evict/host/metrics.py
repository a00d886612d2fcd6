"""Prometheus metrics, exported on vLLM's own /metrics.

The counters are updated where the work happens: the scheduler (engine core process) counts
requests, compactions, evicted tokens and freed pages; the workers time scoring and
compaction. For `vllm serve` with eviction the plugin turns on prometheus_client's
multiprocess mode (the mode vLLM itself uses with several API servers) before any engine
process starts, so vLLM's /metrics collects these from every process. Offline engines record
them in-process.
"""

from __future__ import annotations

import functools
import os

PREFIX = "vllm_evict:"


def enable_multiprocess_collection() -> None:
    """Call in the API server before engines start (and before vLLM creates its metrics)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    from prometheus_client import values
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus

    from vllm_evict.host.patching import record

    setup_multiprocess_prometheus()
    record("PROMETHEUS_MULTIPROC_DIR, prometheus_client.values.ValueClass", "environment",
           "vllm_evict:* metrics from every process on vLLM's /metrics")
    # prometheus_client picks its value class when it is first imported; vLLM imported it
    # before our flags were parsed, so pick again now that the directory is set.
    values.ValueClass = values.get_value_class()


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(f"{PREFIX}requests", "Requests by eviction policy (none included).",
                                ["policy"])
        self.compactions = Counter(f"{PREFIX}compactions", "Compactions (per request).", ["policy"])
        self.tokens_evicted = Counter(f"{PREFIX}tokens_evicted",
                                      "KV entries evicted per (layer, KV head).", ["policy"])
        self.pages_freed = Counter(f"{PREFIX}pages_freed",
                                   "Pages returned to vLLM's pool before requests finished.")
        self.kept_fraction = Histogram(
            f"{PREFIX}kept_fraction", "Physical / logical length of finished requests that evicted.",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))
        self.policy_failures = Counter(
            f"{PREFIX}policy_failures", "Compactions whose policy raised or returned a malformed "
            "selection; they kept sinks + recent tokens instead.", ["policy"])
        self.scoring_seconds = Counter(f"{PREFIX}scoring_seconds",
                                       "Time spent measuring attention statistics.")
        self.compaction_seconds = Counter(f"{PREFIX}compaction_seconds",
                                          "Time spent selecting and compacting.")


@functools.cache
def metrics() -> _Metrics:
    return _Metrics()
