"""Self-critical sequence training (Rennie et al. 2017), with the "new self-critical" baseline (Luo 2020).

For each image of a batch, `samples` captions are drawn from the model (the frozen LM through the
prefix, on its KV cache, all images at once), each rewarded by CIDEr-D against the image's training
references, with document frequencies from all training references (pipeline.training.cider). A sample's
baseline is the mean reward of the image's other samples, so no greedy decode is needed and the
advantages of an image sum to zero. The loss is the advantage-weighted cross-entropy of the samples:
descending it raises the log-probability of captions that beat their siblings. Only what the model
trains learns (the mapper; the LM stays as `lm.train` says).

Rewards and validation count syllables, as the scoring protocol does: a caption is decoded to text,
then tokenised by `pipeline.evaluation.text.protocol_text`. Validation is the CIDEr-D of the validation split's
captions decoded as `viclip score` decodes (beam search, score settings), with the validation
references' own document frequencies: pycocoevalcap's CIDEr on that split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.config import ScoreConfig, ScstSettings
from pipeline.core.devices import Precision, autocast
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore, stored_records
from pipeline.decoding.beam import caption_features, token_limit
from pipeline.decoding.sampling import sample
from pipeline.evaluation.text import protocol_text
from pipeline.models.base import CaptionModel
from pipeline.training.cider import CiderD
from pipeline.training.optimisation import Optimisation


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(N, S) rewards -> (N, S) reward minus the mean reward of the image's other samples."""
    samples = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)


def references(records: Sequence[ImageRecord]) -> list[list[str]]:
    """Each image's references as the scoring protocol's syllables."""
    return [[protocol_text(c) for c in r.captions] for r in records]


@dataclass
class ImageSet:
    """A split's images for SCST: their features, and their rows in a CIDEr-D corpus of their references."""

    features: torch.Tensor  # (N, D) on the device
    cider: CiderD  # references of the same N images, in the same order

    @classmethod
    def build(cls, records: Sequence[ImageRecord], store: FeatureStore, device: torch.device) -> ImageSet:
        records = stored_records(records, store)
        rows = store.positions([r.image_id for r in records])
        return cls(torch.from_numpy(store.read(rows)).to(device), CiderD(references(records)))

    def __len__(self) -> int:
        return len(self.features)


def scst_epoch(
    trained: torch.nn.Module, model: CaptionModel, data: ImageSet, settings: ScstSettings,
    optimisation: Optimisation, generator: torch.Generator, description: str,
) -> float:
    """One pass over the training images; returns the mean reward of the samples (over every rank).
    `trained` is the model or its DistributedDataParallel wrapper; each rank samples for its share of each
    batch's images, its token-mean loss weighted by its share of the batch's sampled tokens, so the ranks'
    averaged gradients are those of one process's token mean."""
    order = torch.randperm(len(data), generator=generator)
    total, drawn = 0.0, 0
    steps = -(-len(data) // settings.batch_size)
    limit = token_limit(model, settings.max_length)
    for start in tqdm(range(0, len(data), settings.batch_size), total=steps, desc=description,
                      disable=distributed.progress_disabled()):
        batch = order[start : start + settings.batch_size]
        share = distributed.shard(len(batch))
        images = batch[share.start : share.stop] if len(share) else batch[:1]
        features = data.features[images.to(data.features.device)]
        model.eval()  # sampling draws from the model as it decodes
        with autocast(features.device, optimisation.policy):
            tokens, lengths = sample(model, features, settings.samples, limit)
        texts = [protocol_text(model.decode(row[:n].tolist())) for row, n in zip(tokens.cpu(), lengths.tolist())]
        rewards = data.cider.scores(texts, np.repeat(images.numpy(), settings.samples))
        rewards = torch.tensor(rewards, dtype=torch.float32, device=features.device).view(len(images), -1)
        mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        counted = float(mask.sum()) if len(share) else 0.0
        weight = counted / distributed.all_sum(counted)[0] * distributed.world_size()
        trained.train()
        with autocast(features.device, optimisation.policy):
            loss = trained(features.repeat_interleave(settings.samples, 0), tokens.clone(), mask,
                           advantages(rewards).flatten())
        optimisation.step(trained, loss * weight)
        if len(share):
            total += float(rewards.sum())
            drawn += rewards.numel()
    total, drawn = distributed.all_sum(total, drawn)
    return total / drawn


def validation_cider(model: CaptionModel, data: ImageSet, settings: ScoreConfig) -> float:
    """CIDEr-D of the split's captions decoded as `viclip score` decodes them, in fp32 whatever precision
    training runs in (every rank decodes it all)."""
    model.eval()
    texts = caption_features(model, data.features, settings, description=None).texts
    return float(data.cider.scores([protocol_text(t) for t in texts], np.arange(len(texts))).mean())


@dataclass
class SelfCritical:
    """What an SCST model trains by (pipeline.training.trainer): rewards in training, CIDEr-D in validation."""

    model: CaptionModel
    data: dict[str, ImageSet]  # train (the reward's references and document frequencies) and val
    settings: ScstSettings
    decoding: ScoreConfig  # how validation captions are decoded: as `viclip score` decodes
    columns = ("reward", "val_cider")
    higher_is_better = True

    @property
    def steps(self) -> int:
        return -(-len(self.data["train"]) // self.settings.batch_size)

    def epoch(self, trained: torch.nn.Module, optimisation: Optimisation, generator: torch.Generator,
              description: str) -> float:
        return scst_epoch(trained, self.model, self.data["train"], self.settings, optimisation, generator, description)

    def validate(self, model: CaptionModel, policy: Precision) -> float:
        """`policy` is training's: validation decodes as `viclip score` does, in fp32."""
        return validation_cider(model, self.data["val"], self.decoding)
