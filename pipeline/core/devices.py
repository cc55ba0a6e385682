"""Which device a run uses, at which precision (one policy for every GPU a user has), and how to name it."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Literal, get_args

import torch

from pipeline.core.errors import ViclipError

Precision = Literal["bf16", "fp16", "fp32"]
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FEATURE_BUDGET = "VICLIP_FEATURE_BUDGET_MB"  # overrides `feature_budget`: how much of a store is kept in memory


def best_device() -> torch.device:
    """The GPU this process was given (torchrun's LOCAL_RANK, set by `distributed.session`), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices natively (and so faster than fp32): CUDA GPUs of compute
    capability 8.0 and up (A100, H100, RTX 30/40), CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 is
    emulated, and slower. `torch.cuda.is_bf16_supported()` counts emulation: it says True on a T4."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    # torch exposes the CPU's capabilities only privately; without them, assume none.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def precision(device: torch.device) -> Precision:
    """The precision policy for training and extraction: bf16 autocast where bf16 is native; fp16
    autocast on CUDA 7.x (T4, V100), whose tensor cores run fp16 (training adds a gradient scaler);
    fp32 elsewhere: a P100 (6.0) has no tensor cores, and its fp16 is too easily out of range for
    a gain no one has measured here.

    VICLIP_PRECISION=fp32|bf16|fp16 in the environment overrides the policy wherever it applies (for
    example to benchmark a bf16 CPU in fp32); extraction on a CPU stays fp32 whatever it says."""
    override = _override("VICLIP_PRECISION")
    if override:
        return override
    if native_bf16(device):
        return "bf16"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 7:
        return "fp16"
    return "fp32"


def frozen_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen LM's weights are held in: the precision policy's on a GPU (bf16, or fp16 on a T4 or
    V100), since autocast would otherwise cast every frozen fp32 weight again at every forward (it caches casts
    only of weights that require gradients), and half the bytes let a 4B LM fit a 16 GB T4. fp32 on the CPU:
    bf16 weights made this project's CPU step 2.4x slower (BENCHMARKS.md). A runtime choice, not part of the
    model: what a GPU trained, a CPU serves.

    VICLIP_FROZEN_PRECISION=fp32|bf16|fp16 overrides it (the tests hold half-precision weights on the CPU)."""
    override = _override("VICLIP_FROZEN_PRECISION")
    return DTYPES[override or (precision(device) if device.type == "cuda" else "fp32")]


def compiling(device: torch.device) -> bool:
    """Whether the training step and the beam-search step are compiled (torch.compile; CUDA graphs on a GPU):
    on a GPU, where a step is otherwise bound by the host issuing kernels one by one. Not by default on a CPU,
    although a full-size step compiled is 1.4x faster there and repays its compile within minutes (BENCHMARKS.md):
    it needs a C++ compiler, and tiny models compile for longer than they train. VICLIP_COMPILE=on|off overrides it."""
    return _switch("VICLIP_COMPILE", device)


def jpegs_on_device(device: torch.device) -> bool:
    """Whether JPEG files are decoded on the device (nvJPEG, through torchvision, on a GPU) rather than by Pillow in
    the loader's workers: on a GPU, whose decoder keeps pace with the encoder where a machine's cores may not.
    VICLIP_DEVICE_JPEGS=on|off overrides it; `on` on a CPU decodes them in the main process (torchvision's
    libjpeg-turbo), which the tests use to run the device's path."""
    return _switch("VICLIP_DEVICE_JPEGS", device)


def _switch(variable: str, device: torch.device) -> bool:
    """An environment setting of on, off or auto (unset): auto is on on a GPU, off elsewhere."""
    value = os.environ.get(variable, "auto")
    if value not in ("auto", "on", "off"):
        raise ViclipError(f"{variable}={value!r}: expected one of auto, on, off")
    return device.type == "cuda" if value == "auto" else value == "on"


def _override(variable: str) -> Precision | None:
    value = os.environ.get(variable)
    if value and value not in get_args(Precision):
        raise ViclipError(f"{variable}={value!r}: expected one of {', '.join(get_args(Precision))}")
    return value or None


def autocast(device: torch.device, policy: Precision):
    """Mixed precision as the policy says; fp32 is autocast switched off."""
    return torch.autocast(device.type, dtype=DTYPES[policy], enabled=policy != "fp32")


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


def memory_mb() -> int:
    """The memory this process may use: the machine's, or its container's limit where lower."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in CGROUP_LIMITS:
        try:
            limits.append(int(path.read_text().strip()))
        except (OSError, ValueError):  # no such cgroup, or "max": no limit
            pass
    return min(limits) // 2**20


def feature_budget(device: torch.device) -> int:
    """Bytes of image features a run may hold on `device`: a quarter of the GPU's memory, or of the host's
    (the LM, activations and other processes need the rest). A store over budget is streamed from disk."""
    if os.environ.get(FEATURE_BUDGET):
        return int(float(os.environ[FEATURE_BUDGET]) * 2**20)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return memory_mb() * 2**20 // 4
