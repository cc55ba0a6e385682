"""Many processes, one result: `extract`, `train` and `score` under torchrun, on PyTorch's own engine.

torchrun starts one process per GPU (or per CPU share) and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `session` joins the process group: NCCL on
GPUs, gloo on CPUs. Without torchrun there is one process of rank 0 in a world of 1, and every helper
here is the identity, so the stages have one code path.

`VICLIP_NPROC=N viclip train ...` launches itself through torch's elastic launcher on this machine; runs
across machines call `torchrun` directly (README: "Scaling out"). A rank that dies takes the run down:
the launcher stops the other ranks and exits non-zero, and a collective that waits longer than
`VICLIP_TIMEOUT_S` (default 30 minutes) fails instead of hanging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

NPROC = "VICLIP_NPROC"  # processes to launch on this machine
TIMEOUT = "VICLIP_TIMEOUT_S"  # longest wait of a collective, in seconds
COMMANDS = ("extract", "train", "score")  # the commands that run on many processes


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the one process that writes artifacts, logs and progress bars."""
    return rank() == 0


def progress_disabled() -> bool | None:
    """tqdm's `disable`: off on every rank but the main one, which shows it on a terminal."""
    return True if not is_main() else None


def shard(count: int) -> range:
    """This rank's contiguous share of `count` items: shares differ in size by at most one, in rank order,
    so concatenating them in rank order gives range(count) back."""
    size, rest = divmod(count, world_size())
    start = rank() * size + min(rank(), rest)
    return range(start, start + size + (rank() < rest))


@contextmanager
def session() -> Iterator[None]:
    """Join the process group for the block, where torchrun started this process; nothing otherwise."""
    if world_size() == 1 or dist.is_initialized():
        yield
        return
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT, 1800)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """Each value summed over every rank (float64, so counts stay exact)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wants_launch(argv: list[str]) -> int:
    """How many processes `VICLIP_NPROC` asks this command to launch (0: run here, as it is)."""
    wanted = os.environ.get(NPROC, "").strip()
    if not wanted or "LOCAL_RANK" in os.environ or not argv or argv[0] not in COMMANDS:
        return 0
    if not wanted.isdigit() or int(wanted) < 1:
        raise ValueError(f"{NPROC}={wanted!r}: expected a whole number of processes, 1 or more")
    return int(wanted) if int(wanted) > 1 else 0


def launch(nproc: int, argv: list[str]) -> int:
    """Run `viclip ARGV` as `nproc` processes on this machine through torch's elastic launcher (what
    `torchrun --standalone` runs); returns the exit code, non-zero when any rank failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "pipeline.cli", *argv]
    )
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        print(f"error: viclip {argv[0]} on {nproc} processes failed: rank {rank} {how}, and the launcher "
              "stopped the others", file=sys.stderr)
        return 1
    return 0
