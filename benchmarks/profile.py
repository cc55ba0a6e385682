"""`python -m benchmarks.profile`: where the time of one viclip training step goes.

One step of the train case (full-size models, one batch of 40 KTVIC-length captions, the benchmark's
own epoch code), after a warm-up step, under torch.profiler. Prints the ops with the most self CPU
time, each as a share of the step's, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
from typing import get_args

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import workload
from benchmarks.suite import _viclip_epoch, caption_set
from pipeline.core.devices import Precision, best_device, hardware, precision


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--precision", choices=get_args(Precision), help="Instead of the device's policy.")
    parser.add_argument("--top", type=int, default=15, help="How many ops to list.")
    args = parser.parse_args()
    if args.precision:
        os.environ["VICLIP_PRECISION"] = args.precision

    device = best_device()
    captioner = workload.captioner(device)
    images = workload.params().train.viclipcap.batch_size // workload.CAPTIONS_PER_IMAGE  # one batch
    _viclip_epoch(captioner, caption_set(workload.captions(images, seed=1), captioner, device))  # warm-up
    batch = caption_set(workload.captions(images), captioner, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as run:
        _viclip_epoch(captioner, batch)
    ops = sorted(run.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)
    total = sum(op.self_cpu_time_total for op in ops)
    print(f"One step, {len(batch)} captions, {precision(device)}, {hardware(device)}, torch {torch.__version__}: "
          f"{total / 1e6:.2f} s of self CPU time\n")
    print("| share | self CPU (s) | calls | op |\n|---|---|---|---|")
    for op in ops[: args.top]:
        print(f"| {op.self_cpu_time_total / total:.1%} | {op.self_cpu_time_total / 1e6:.2f} | {op.count} | `{op.key}` |")


if __name__ == "__main__":
    main()
