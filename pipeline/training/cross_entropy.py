"""The cross-entropy objective: teacher forcing on every caption, the validation loss after each epoch.

Each rank's loss is its share of a global batch's token mean, weighted as `batches.CaptionSet.batches`
says, so what is optimised is the global batch's token mean, exactly as on one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.devices import Precision, autocast
from pipeline.models.base import CaptionModel
from pipeline.training.batches import CaptionSet
from pipeline.training.optimisation import Optimisation


def train_epoch(
    model: torch.nn.Module, data: CaptionSet, batch_size: int, optimisation: Optimisation,
    generator: torch.Generator, description: str,
) -> float:
    """One pass over `data`; returns the token mean of the training loss over every rank. `model` is the
    CaptionModel, or its DistributedDataParallel wrapper: the loss goes through its forward either way."""
    model.train()
    total, tokens_seen = 0.0, 0.0
    steps = (len(data) + batch_size - 1) // batch_size
    batches = data.batches(batch_size, generator)
    for features, tokens, mask, weight in tqdm(batches, total=steps, desc=description, disable=distributed.progress_disabled()):
        with autocast(features.device, optimisation.policy):
            loss = model(features, tokens, mask)
        optimisation.step(model, loss * weight)
        count = float(mask.sum()) if weight else 0.0
        total += loss.item() * count
        tokens_seen += count
    total, tokens_seen = distributed.all_sum(total, tokens_seen)
    return total / tokens_seen


@torch.no_grad()
def evaluate(model: CaptionModel, data: CaptionSet, batch_size: int, policy: Precision) -> float:
    """The token mean of the loss over `data` (each rank scores its share of each batch), no gradients."""
    model.eval()
    total, tokens_seen = 0.0, 0.0
    for features, tokens, mask, weight in data.batches(batch_size):
        count = float(mask.sum()) if weight else 0.0
        with autocast(features.device, policy):
            total += model.loss(features, tokens, mask).item() * count
        tokens_seen += count
    total, tokens_seen = distributed.all_sum(total, tokens_seen)
    return total / tokens_seen


@dataclass
class CrossEntropy:
    """Teacher-forced cross-entropy on every caption, validation loss after each epoch (lower is better)."""

    data: dict[str, CaptionSet]  # train and val
    batch_size: int
    columns = ("train_loss", "val_loss")  # what the training log calls the two figures of an epoch
    higher_is_better = False

    @property
    def steps(self) -> int:
        """Optimiser steps an epoch."""
        return -(-len(self.data["train"]) // self.batch_size)

    def epoch(self, trained: torch.nn.Module, optimisation: Optimisation, generator: torch.Generator,
              description: str) -> float:
        return train_epoch(trained, self.data["train"], self.batch_size, optimisation, generator, description)

    def validate(self, model: CaptionModel, policy: Precision) -> float:
        return evaluate(model, self.data["val"], self.batch_size, policy)
