"""Caption batches kept on the device: every caption of a split tokenised and padded once.

On several processes (torchrun) every rank walks the same shuffled order of global batches
(`train.*.batch_size` captions each) and takes its contiguous share of each. A rank's loss is its share's
token mean, weighted by its share of the global batch's tokens times the number of ranks;
DistributedDataParallel averages gradients over ranks, so what is optimised is the global batch's token
mean, exactly as on one process. No caption is padded in or dropped: a rank whose share of the last batch
is empty runs one caption with weight 0, since every rank must take part in each gradient exchange.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.core import distributed
from pipeline.core.devices import feature_budget
from pipeline.core.errors import ViclipError
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore, stored_records

STATIC_WIDTH = 16  # a compiled step's batch widths are multiples of it: a few shapes, each compiled once


def round_up(length: int, step: int) -> int:
    """The smallest multiple of `step` that holds `length`."""
    return -(-length // step) * step


@dataclass
class CaptionSet:
    """Every caption of a split, tokenised once, padded once, on the device; the image features too where
    they fit the device's budget (`devices.feature_budget`), else each batch's rows are read from the store."""

    features: torch.Tensor | FeatureStore  # (N, ...) one row of features per image, or the store to read them from
    image_rows: torch.Tensor  # (M,) the image row of each caption
    tokens: torch.Tensor  # (M, T) right-padded token ids, the stop included
    # (M,) real tokens per caption, on the host: each batch's width and weight are worked out there, without
    # waiting for the device; the device's own copy makes the masks.
    lengths: torch.Tensor
    device_lengths: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = self.lengths.cpu()
        self.device_lengths = self.lengths.to(self.tokens.device)

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
        # Padding is masked, whatever its id; room for the widest static width (`batches`) the LM has room for.
        width = min(round_up(longest, STATIC_WIDTH), max_tokens or sys.maxsize)
        tokens = torch.zeros((len(ids), width), dtype=torch.long)
        for row, caption in enumerate(ids):
            tokens[row, : len(caption)] = torch.tensor(caption)
        rows = store.positions([r.image_id for r in records])
        image_rows = [row for row, r in zip(rows, records) for _ in r.captions]  # rows of the store, either way
        in_memory = len(store) * store.row_bytes <= feature_budget(device)
        return cls(
            torch.from_numpy(store.embeddings).to(device) if in_memory else store,
            torch.tensor(image_rows, device=device),
            tokens.to(device),
            torch.tensor([len(t) for t in ids]),
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
        self, batch_size: int, generator: torch.Generator | None = None, width_step: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """This rank's share of each global batch: (features (b, ...), tokens (b, T), mask (b, T), weight),
        cut to its longest caption rounded up to a multiple of `width_step` (a compiled step's few static
        widths); weight scales the share's mean loss into its part of the global mean."""
        order = torch.randperm(len(self), generator=generator) if generator else torch.arange(len(self))
        on_device = order.to(self.tokens.device)  # copied once an epoch, not once a batch
        ranks = distributed.world_size()
        for start in range(0, len(self), batch_size):
            batch = slice(start, start + batch_size)
            lengths = self.lengths[order[batch]]
            share = distributed.shard(len(lengths))
            weight = float(lengths[share.start : share.stop].sum()) / float(lengths.sum()) * ranks
            mine = slice(share.start, share.stop) if len(share) else slice(0, 1)
            width = min(round_up(int(lengths[mine].max()), width_step), self.tokens.shape[1])
            rows = on_device[batch][mine]
            tokens = self.tokens[rows, :width]
            mask = torch.arange(width, device=tokens.device) < self.device_lengths[rows].unsqueeze(1)
            yield self.rows(rows), tokens, mask, weight
