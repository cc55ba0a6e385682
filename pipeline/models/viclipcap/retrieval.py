"""Retrieval-augmented prompts, after SmallCap: captions of similar training images, read by the frozen LM.

SmallCap retrieves captions by CLIP image-text similarity; CLIP's text encoder does not read Vietnamese,
so here an image retrieves the training images nearest to it by cosine similarity of the stored CLIP
image embeddings, and takes one caption from each of the k nearest (each image's first, in annotation
order): k captions in all, from k different images. The prompt is `retrieval.template` with the
captions in place of "{captions}", joined by `retrieval.separator`.

The datastore is the training split alone (the validation and test images are never in it), kept in the
model directory, so `score`, `caption` and `serve` retrieve exactly as training did. An image never
retrieves itself: a datastore entry whose embedding is the query's (cosine within SELF of 1) is skipped,
which also skips exact duplicates of the image filed under other ids.

Search is exact: one (B, D) x (D, N) matrix product, a millisecond for KTVIC's 3,769 images. Past a
million captions an approximate index (FAISS, with an IVF-PQ or HNSW index) would keep a query in the
milliseconds and the vectors in memory: exact search there is a 2 GB matrix read per batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.config import RetrievalConfig
from pipeline.core.errors import ViclipError
from pipeline.core.io import write_json
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore

EMBEDDINGS = "datastore.safetensors"
CAPTIONS = "datastore.json"
FORMAT = "viclip-datastore/1"
SELF = 1e-5  # cosine this close to 1: the image itself (the same stored embedding), or an exact duplicate


@dataclass
class Datastore:
    """The training images a prompt's captions come from: their embeddings and one caption each."""

    embeddings: torch.Tensor  # (N, D) L2-normalised, fp32, on the device
    image_ids: list[int]
    captions: list[str]  # the caption each image lends a prompt
    source: dict[str, Any]  # the split and the feature store's attributes it was built from

    @classmethod
    def build(cls, store: FeatureStore, records: Sequence[ImageRecord], device: torch.device) -> Datastore:
        """The training split's store and captions (images the store skipped as unreadable are left out)."""
        if store.attrs.get("split") != "train":
            raise ViclipError(f"{store.path}: a datastore is built from the train split, not {store.attrs.get('split')!r}")
        by_id = {r.image_id: r for r in records}
        ids = [int(i) for i in store.image_ids]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ViclipError(f"{store.path}: image id {missing[0]} has no captions in the train split")
        embeddings = torch.from_numpy(np.asarray(store.embeddings, dtype=np.float32))
        # As config.json will hold it (JSON types), so a rebuilt datastore's record compares equal.
        source = json.loads(json.dumps({"split": "train", "images": len(ids), "store": store.identity()}))
        return cls(_unit(embeddings).to(device), ids, [by_id[i].captions[0] for i in ids], source)

    def nearest(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """(B, D) image embeddings -> (B, k) datastore rows, the nearest first, never the image itself."""
        with torch.autocast(embeddings.device.type, enabled=False):
            similarity = _unit(embeddings.float()) @ self.embeddings.T  # (B, N)
        similarity[similarity > 1 - SELF] = float("-inf")
        return similarity.topk(k, dim=1).indices

    def save(self, directory: Path) -> None:
        save_file({"embeddings": self.embeddings.cpu().contiguous(), "image_ids": torch.tensor(self.image_ids)},
                  str(directory / EMBEDDINGS))
        write_json(directory / CAPTIONS, {"format": FORMAT, "source": self.source, "captions": self.captions})

    @classmethod
    def load(cls, directory: Path, width: int, device: torch.device) -> Datastore:
        """What `save` wrote, for embeddings `width` wide (the model's store)."""
        try:
            tensors = load_file(str(directory / EMBEDDINGS))
            raw = json.loads((directory / CAPTIONS).read_text(encoding="utf-8"))
            datastore = cls(tensors["embeddings"].to(device), tensors["image_ids"].tolist(), raw["captions"], raw["source"])
            images = len(datastore.image_ids)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, not {FORMAT!r}")
            if len(datastore.captions) != images or datastore.embeddings.shape != (images, width):
                raise ValueError(f"{images} images want {images} captions and {images}x{width} embeddings; it holds "
                                 f"{len(datastore.captions)} captions and {'x'.join(map(str, datastore.embeddings.shape))} embeddings")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
            raise ViclipError(f"{directory}: unreadable retrieval datastore ({str(error).splitlines()[0]})") from None
        return datastore


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings, dim=-1)


@dataclass
class Retrieval:
    """Prompts for images: the datastore, and how many captions go into which template."""

    datastore: Datastore
    settings: RetrievalConfig

    def __post_init__(self) -> None:
        images = len(self.datastore.image_ids)
        if self.settings.k >= images:  # an image never retrieves itself: k others at most
            raise ViclipError(f"retrieval.k is {self.settings.k}, but the datastore holds {images} training images: "
                              f"k must be below {images}")

    def texts(self, embeddings: torch.Tensor) -> list[str]:
        """(B, D) image embeddings -> each image's prompt."""
        rows = self.datastore.nearest(embeddings, self.settings.k).tolist()
        return [self.prompt([self.datastore.captions[r] for r in row]) for row in rows]

    def prompt(self, captions: Sequence[str]) -> str:
        return self.settings.template.replace("{captions}", self.settings.separator.join(captions))

    def longest(self, lengths: Sequence[int]) -> str:
        """The longest prompt there can be, given each datastore caption's length in tokens: the template
        around the k longest captions (byte-level BPE never merges across the spaces between them)."""
        longest = sorted(range(len(lengths)), key=lengths.__getitem__)[-self.settings.k:]
        return self.prompt([self.datastore.captions[i] for i in longest])
