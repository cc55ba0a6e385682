"""Which device a run uses, whether it multiplies bf16 natively, and how to name it in a run's record."""

from __future__ import annotations

import contextlib
import platform
from functools import cache
from pathlib import Path

import torch


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache  # asked at every training step: the hardware does not change
def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices natively (and so faster than fp32): CUDA GPUs from
    Ampere on, CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 would be emulated, and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch exposes the CPU's capabilities only privately; without them, assume none.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def hardware(device: torch.device) -> str:
    """What a run ran on, for the record: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} ({torch.get_num_threads()} threads)"
