"""The cross-entropy objective: teacher forcing on every caption, the validation loss after each epoch.

Each rank's loss is its share of a global batch's token mean, weighted as `batches.CaptionSet.batches`
says, so what is optimised is the global batch's token mean, exactly as on one process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.devices import Precision, autocast
from pipeline.models.base import CaptionModel
from pipeline.training.batches import STATIC_WIDTH, CaptionSet
from pipeline.training.optimisation import Optimisation


def train_epoch(
    model: torch.nn.Module, data: CaptionSet, batch_size: int, optimisation: Optimisation,
    generator: torch.Generator, description: str, compiled: bool = False, time_first_step: bool = False,
) -> float:
    """One pass over `data`; returns the token mean of the training loss over every rank. `model` is the
    CaptionModel, its DistributedDataParallel wrapper or, `compiled`, its `torch.compile`d forward: the loss
    goes through its forward either way. A compiled step sees a few static widths. `time_first_step`: the
    first step (a compiled one's first compile) is timed and reported, at the cost of one wait for the device."""
    model.train()
    mean = TokenMean(data.tokens.device)
    steps = (len(data) + batch_size - 1) // batch_size
    batches = data.batches(batch_size, generator, STATIC_WIDTH if compiled else 1)
    started = time.perf_counter()
    for index, (features, tokens, mask, weight) in enumerate(
            tqdm(batches, total=steps, desc=description, disable=distributed.progress_disabled())):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
        with autocast(features.device, optimisation.policy):
            loss = model(features, tokens, mask)
        optimisation.step(model, loss * weight)
        mean.add(loss, mask, weight)
        if time_first_step and index == 0 and distributed.is_main():
            loss.item()  # the step has run
            print(f"{description}: first step, compiling it, took {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return mean.value()


def compile_forward(model: CaptionModel, device: torch.device) -> torch.nn.Module:
    """The model's training forward compiled (and so its backward): inductor's fused kernels, and on a GPU
    CUDA graphs that launch a step's kernels at once. One graph a static width and batch size: no shape is
    traced twice. torch runs any shape past its recompile limit (8) eagerly, without a word: an LM whose captions
    reach 128 tokens has 8 widths, and a run's last batch is smaller."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


class TokenMean:
    """The token mean of batch losses over every rank, summed on the device and read once at the end: reading
    a loss each batch (`.item()`) would make the host wait for the device at every step."""

    def __init__(self, device: torch.device):
        # fp64, as Python's floats: the same sums as adding each batch's figures on the host.
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, mask: torch.Tensor, weight: float) -> None:
        """A batch's mean loss over its real tokens (`mask`); a share of weight 0 (a rank's stand-in caption
        in the last batch) counts for nothing."""
        if weight:
            count = mask.sum().double()
            self.total += loss.detach().double() * count
            self.tokens += count

    def value(self) -> float:
        total, tokens = distributed.all_sum(float(self.total), float(self.tokens))
        return total / tokens


@torch.no_grad()
def evaluate(model: CaptionModel, data: CaptionSet, batch_size: int, policy: Precision) -> float:
    """The token mean of the loss over `data` (each rank scores its share of each batch), no gradients."""
    model.eval()
    mean = TokenMean(data.tokens.device)
    for features, tokens, mask, weight in data.batches(batch_size):
        with autocast(features.device, policy):
            mean.add(model.loss(features, tokens, mask), mask, weight)
    return mean.value()


@dataclass
class CrossEntropy:
    """Teacher-forced cross-entropy on every caption, validation loss after each epoch (lower is better)."""

    data: dict[str, CaptionSet]  # train and val
    batch_size: int
    compiled: torch.nn.Module | None = None  # the model's compiled forward (`compile`), which then trains it
    compiling: bool = False  # `compile` has not yet run a step: the next epoch's first one is timed
    columns = ("train_loss", "val_loss")  # what the training log calls the two figures of an epoch
    higher_is_better = False

    @property
    def steps(self) -> int:
        """Optimiser steps an epoch."""
        return -(-len(self.data["train"]) // self.batch_size)

    def compile(self, model: CaptionModel, device: torch.device) -> None:
        self.compiled, self.compiling = compile_forward(model, device), True

    def epoch(self, trained: torch.nn.Module, optimisation: Optimisation, generator: torch.Generator,
              description: str) -> float:
        compiled, timed, self.compiling = self.compiled is not None, self.compiling, False
        return train_epoch(self.compiled if compiled else trained, self.data["train"], self.batch_size, optimisation,
                           generator, description, compiled, time_first_step=timed)

    def validate(self, model: CaptionModel, policy: Precision) -> float:
        return evaluate(model, self.data["val"], self.batch_size, policy)
