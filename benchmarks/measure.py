"""Time a block of work; report the peak memory of the process that ran it (each case has its own), or
profile it."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


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


def profiled(work: Callable[[], Any], device: torch.device, steps: int) -> dict[str, float | None]:
    """`work` (`steps` steps of something, warmed up) once under torch.profiler, per step: the kernels launched
    (on a CPU, the aten ops called), the host's time to issue them, the wall time to their end, and the share of
    that wall time in which the GPU ran a kernel (kernel times summed: overlapping ones would count twice)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as run:
        start = time.perf_counter()
        work()
        issued = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = run.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        count, busy = sum(e.count for e in kernels), sum(e.self_device_time_total for e in kernels) / 1e6 / wall
    else:
        # The ops that the step's code (or autograd's backward) called, not the ops they call in turn.
        count = sum(1 for e in run.events() if e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
        busy = None
    return {"steps": steps, "kernels_a_step": count / steps, "host_seconds_a_step": issued / steps,
            "wall_seconds_a_step": wall / steps, "gpu_busy": busy}
