"""Caption batches kept on the device, and the epoch loops that train and validate a model (either one).

On several processes (torchrun) every rank walks the same shuffled order of global batches
(`train.*.batch_size` captions each) and takes its contiguous share of each. A rank's loss is its share's
token mean, weighted by its share of the global batch's tokens times the number of ranks;
DistributedDataParallel averages gradients over ranks, so what is optimised is the global batch's token
mean, exactly as on one process. No caption is padded in or dropped: a rank whose share of the last batch
is empty runs one caption with weight 0, since every rank must take part in each gradient exchange.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from pipeline import distributed
from pipeline.config import TrainSettings
from pipeline.data import ImageRecord
from pipeline.devices import Precision, autocast, feature_budget, precision
from pipeline.errors import ViclipError
from pipeline.features import FeatureStore
from pipeline.models.base import CaptionModel, trainable


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stored_records(records: Sequence[ImageRecord], store: FeatureStore) -> list[ImageRecord]:
    """The split's images that have features in `store`; refused where one is absent that extract did not
    record as skipped (unreadable): the store is of other data."""
    stored = set(store.image_ids.tolist())
    skipped = set(store.attrs.get("skipped_ids", []))
    absent = [r.image_id for r in records if r.image_id not in stored and r.image_id not in skipped]
    if absent:
        raise ViclipError(
            f"{store.path}: no embedding for {len(absent)} images of the data split "
            f"(e.g. id {absent[0]}); re-run `viclip extract`"
        )
    return [r for r in records if r.image_id in stored]


@dataclass
class CaptionSet:
    """Every caption of a split, tokenised once, padded once, on the device; the image features too where
    they fit the device's budget (`devices.feature_budget`), else each batch's rows are read from the store."""

    features: torch.Tensor | FeatureStore  # (N, ...) one row of features per image, or the store to read them from
    image_rows: torch.Tensor  # (M,) the image row of each caption
    tokens: torch.Tensor  # (M, T) right-padded token ids, the stop included
    lengths: torch.Tensor  # (M,) real tokens per caption

    @classmethod
    def build(
        cls, records: Sequence[ImageRecord], store: FeatureStore,
        encode: Callable[[list[str]], list[list[int]]], max_tokens: int | None, device: torch.device,
    ) -> CaptionSet:
        records = stored_records(records, store)
        captions = [c for r in records for c in r.captions]
        ids = encode(captions)
        longest = max(len(t) for t in ids)
        if max_tokens is not None and longest > max_tokens:
            raise ViclipError(f"a caption of {longest} tokens does not fit the LM after the prefix (and prompt): {max_tokens} positions left")
        tokens = torch.zeros((len(ids), longest), dtype=torch.long)  # padding is masked, whatever its id
        for row, caption in enumerate(ids):
            tokens[row, : len(caption)] = torch.tensor(caption)
        rows = store.positions([r.image_id for r in records])
        image_rows = [row for row, r in zip(rows, records) for _ in r.captions]  # rows of the store, either way
        in_memory = len(store) * store.row_bytes <= feature_budget(device)
        return cls(
            torch.from_numpy(store.embeddings).to(device) if in_memory else store,
            torch.tensor(image_rows, device=device),
            tokens.to(device),
            torch.tensor([len(t) for t in ids], device=device),
        )

    def rows(self, captions: torch.Tensor) -> torch.Tensor:
        """The image features of the given captions, on the device."""
        if isinstance(self.features, torch.Tensor):
            return self.features[self.image_rows[captions]]
        rows = self.features.read(self.image_rows[captions].cpu().numpy())
        return torch.from_numpy(rows).to(self.tokens.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.image_rows)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """This rank's share of each global batch: (features (b, ...), tokens (b, T), mask (b, T), weight),
        cut to its longest caption; weight scales the share's mean loss into its part of the global mean."""
        order = torch.randperm(len(self), generator=generator) if generator else torch.arange(len(self))
        ranks = distributed.world_size()
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size].to(self.tokens.device)
            share = distributed.shard(len(rows))
            lengths = self.lengths[rows]
            weight = float(lengths[share.start : share.stop].sum()) / float(lengths.sum()) * ranks
            rows = rows[share.start : share.stop] if len(share) else rows[:1]
            lengths = self.lengths[rows]
            width = int(lengths.max())
            tokens = self.tokens[rows, :width]
            mask = torch.arange(width, device=tokens.device) < lengths.unsqueeze(1)
            yield self.rows(rows), tokens, mask, weight


@dataclass
class Optimisation:
    """Everything a training step needs besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float | None  # max gradient norm, or None
    policy: Precision  # the precision policy's choice for the device
    # Scales fp16 losses so small gradients do not underflow; a no-op unless the policy is fp16.
    scaler: torch.amp.GradScaler

    @classmethod
    def build(
        cls, model: CaptionModel, settings: TrainSettings, steps: int, device: torch.device
    ) -> Optimisation:
        """AdamW over what is trained, linear warm-up then decay over `steps`, precision from the policy."""
        optimizer = torch.optim.AdamW(trainable(model), lr=settings.lr, weight_decay=settings.weight_decay)
        policy = precision(device)
        return cls(
            optimizer, get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, steps),
            settings.grad_clip, policy, torch.amp.GradScaler(device.type, enabled=policy == "fp16"),
        )

    def state_dict(self) -> dict:
        return {part: getattr(self, part).state_dict() for part in ("optimizer", "scheduler", "scaler")}

    def load_state_dict(self, state: dict) -> None:
        for part, values in state.items():
            getattr(self, part).load_state_dict(values)

    def step(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainable(model), self.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped where fp16 gradients overflowed
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # the scale drops only after a skipped step
            self.scheduler.step()


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
