"""Caption batches kept on the device, and the epoch loops that train and validate the mapper."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.captioner import Captioner
from pipeline.data import ImageRecord
from pipeline.errors import ViclipError
from pipeline.features import FeatureStore
from pipeline.lm import LanguageModel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class CaptionSet:
    """Every caption of a split, tokenised once, padded once, on the device."""

    embeddings: torch.Tensor  # (N, D) one row per image
    image_rows: torch.Tensor  # (M,) the image row of each caption
    tokens: torch.Tensor  # (M, T) right-padded token ids, end-of-text included
    lengths: torch.Tensor  # (M,) real tokens per caption

    @classmethod
    def build(
        cls, records: Sequence[ImageRecord], store: FeatureStore, lm: LanguageModel,
        max_positions: int, device: torch.device,
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
        ids = lm.encode(captions)
        longest = max(len(t) for t in ids)
        if longest > max_positions:
            raise ViclipError(f"a caption of {longest} tokens does not fit the LM after the prefix ({max_positions})")
        tokens = torch.full((len(ids), longest), lm.eos_token_id, dtype=torch.long)
        for row, caption in enumerate(ids):
            tokens[row, : len(caption)] = torch.tensor(caption)
        image_rows = [row for row, r in enumerate(records) for _ in r.captions]
        embeddings = store.rows([r.image_id for r in records])
        return cls(
            torch.from_numpy(embeddings).to(device),
            torch.tensor(image_rows, device=device),
            tokens.to(device),
            torch.tensor([len(t) for t in ids], device=device),
        )

    def __len__(self) -> int:
        return len(self.image_rows)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(embeddings (B, D), tokens (B, T), mask (B, T)), each cut to its longest caption."""
        order = torch.randperm(len(self), generator=generator) if generator else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size].to(self.tokens.device)
            lengths = self.lengths[rows]
            width = int(lengths.max())
            tokens = self.tokens[rows, :width]
            mask = torch.arange(width, device=tokens.device) < lengths.unsqueeze(1)
            yield self.embeddings[self.image_rows[rows]], tokens, mask


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_epoch(
    captioner: Captioner, data: CaptionSet, batch_size: int, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator, description: str,
) -> float:
    """One pass over `data`; returns the caption-weighted mean training loss."""
    captioner.mapper.train()
    total, count = 0.0, 0
    steps = (len(data) + batch_size - 1) // batch_size
    for embeddings, tokens, mask in tqdm(data.batches(batch_size, generator), total=steps, desc=description, disable=None):
        with _autocast(embeddings.device):
            loss = captioner.loss(embeddings, tokens, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(tokens)
        count += len(tokens)
    return total / count


@torch.no_grad()
def evaluate(captioner: Captioner, data: CaptionSet, batch_size: int) -> float:
    """Caption-weighted mean loss over `data`, no gradients."""
    captioner.mapper.eval()
    total, count = 0.0, 0
    for embeddings, tokens, mask in data.batches(batch_size):
        with _autocast(embeddings.device):
            total += captioner.loss(embeddings, tokens, mask).item() * len(tokens)
        count += len(tokens)
    return total / count
