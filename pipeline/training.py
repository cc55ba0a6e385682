"""Caption batches kept on the device, and the epoch loops that train and validate a model (either one)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from pipeline.config import TrainSettings
from pipeline.data import ImageRecord
from pipeline.devices import Precision, autocast, precision
from pipeline.errors import ViclipError
from pipeline.features import FeatureStore
from pipeline.models.base import CaptionModel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class CaptionSet:
    """Every caption of a split, tokenised once, padded once, on the device."""

    features: torch.Tensor  # (N, ...) one row of features per image
    image_rows: torch.Tensor  # (M,) the image row of each caption
    tokens: torch.Tensor  # (M, T) right-padded token ids, the stop included
    lengths: torch.Tensor  # (M,) real tokens per caption

    @classmethod
    def build(
        cls, records: Sequence[ImageRecord], store: FeatureStore,
        encode: Callable[[list[str]], list[list[int]]], max_tokens: int | None, device: torch.device,
    ) -> CaptionSet:
        stored = set(store.image_ids.tolist())
        skipped = set(store.attrs.get("skipped_ids", []))
        absent = [r.image_id for r in records if r.image_id not in stored and r.image_id not in skipped]
        if absent:
            raise ViclipError(
                f"{store.path}: no embedding for {len(absent)} images of the data split "
                f"(e.g. id {absent[0]}); re-run `viclip extract`"
            )
        records = [r for r in records if r.image_id in stored]
        captions = [c for r in records for c in r.captions]
        ids = encode(captions)
        longest = max(len(t) for t in ids)
        if max_tokens is not None and longest > max_tokens:
            raise ViclipError(f"a caption of {longest} tokens does not fit the LM after the prefix ({max_tokens})")
        tokens = torch.zeros((len(ids), longest), dtype=torch.long)  # padding is masked, whatever its id
        for row, caption in enumerate(ids):
            tokens[row, : len(caption)] = torch.tensor(caption)
        image_rows = [row for row, r in enumerate(records) for _ in r.captions]
        features = store.rows([r.image_id for r in records])
        return cls(
            torch.from_numpy(features).to(device),
            torch.tensor(image_rows, device=device),
            tokens.to(device),
            torch.tensor([len(t) for t in ids], device=device),
        )

    def __len__(self) -> int:
        return len(self.image_rows)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(features (B, ...), tokens (B, T), mask (B, T)), each cut to its longest caption."""
        order = torch.randperm(len(self), generator=generator) if generator else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size].to(self.tokens.device)
            lengths = self.lengths[rows]
            width = int(lengths.max())
            tokens = self.tokens[rows, :width]
            mask = torch.arange(width, device=tokens.device) < lengths.unsqueeze(1)
            yield self.features[self.image_rows[rows]], tokens, mask


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
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        policy = precision(device)
        return cls(
            optimizer, get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, steps),
            settings.grad_clip, policy, torch.amp.GradScaler(device.type, enabled=policy == "fp16"),
        )

    def step(self, model: CaptionModel, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped where fp16 gradients overflowed
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # the scale drops only after a skipped step
            self.scheduler.step()


def train_epoch(
    model: CaptionModel, data: CaptionSet, batch_size: int, optimisation: Optimisation,
    generator: torch.Generator, description: str,
) -> float:
    """One pass over `data`; returns the caption-weighted mean training loss."""
    model.train()
    total, count = 0.0, 0
    steps = (len(data) + batch_size - 1) // batch_size
    for features, tokens, mask in tqdm(data.batches(batch_size, generator), total=steps, desc=description, disable=None):
        with autocast(features.device, optimisation.policy):
            loss = model.loss(features, tokens, mask)
        optimisation.step(model, loss)
        total += loss.item() * len(tokens)
        count += len(tokens)
    return total / count


@torch.no_grad()
def evaluate(model: CaptionModel, data: CaptionSet, batch_size: int, policy: Precision) -> float:
    """Caption-weighted mean loss over `data`, no gradients."""
    model.eval()
    total, count = 0.0, 0
    for features, tokens, mask in data.batches(batch_size):
        with autocast(features.device, policy):
            total += model.loss(features, tokens, mask).item() * len(tokens)
        count += len(tokens)
    return total / count
