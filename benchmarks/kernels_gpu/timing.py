"""CUDA-event timing with L2 flushes, and the device copy bandwidth."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# ---------------------------------------------------------------- timing

@dataclass
class Timer:
    device: torch.device
    warmup: int
    reps: int

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        # Bigger than any L2 (50 MB on H100, 60 on H200... 256 MB leaves margin).
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=self.device) if self.cuda else None

    def _median(self, run: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            run()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def eager(self, fn: Callable[[], Any]) -> float:
        return self._median(fn)

    def graph(self, fn: Callable[[], Any]) -> float | None:
        """Median time of replaying fn from a CUDA graph; None if it cannot be captured."""
        if not self.cuda:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and allocate before capture
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as exc:  # report, don't abort the sweep
            print(f"  (graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        return self._median(graph.replay)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    ms = timer.eager(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)
