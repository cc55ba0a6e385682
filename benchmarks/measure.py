"""Time a block of work; report the peak memory of the process that ran it (each case has its own)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch


def measure(work: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Seconds for `work`, and peak memory in MB: allocated CUDA memory on a GPU, else the process's
    peak resident set (both include the models, as a real run's would; not the data-loader workers)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_mb": peak}
