"""What every frozen image encoder offers, the registry the encoders add themselves to, and how a store
names an encoder's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from pipeline.core.devices import Precision, precision


class ImageEncoder(Protocol):
    """A frozen image encoder: how to turn a file into pixels, and pixels into features."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    store_dtype: str  # how its features are stored
    precision: Precision  # how it computes them

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, ...) float32 features."""


@dataclass(frozen=True)
class EncoderFamily:
    """One encoder family: the store attributes it writes, and how to load it, each from a store's params section."""

    attrs: Callable[[Any], dict[str, Any]]
    load: Callable[[Any, torch.device], ImageEncoder]


REGISTRY: dict[str, EncoderFamily] = {}  # filled by each encoder module as it is imported


def register(name: str, family: EncoderFamily) -> None:
    REGISTRY[name] = family


def encoding_precision(device: torch.device) -> Precision:
    """The precision policy on a GPU (cuDNN has no bf16 convolutions below compute capability 8.0, and the
    policy picks fp16 there); fp32 on the CPU, where extraction is a one-off and its figures are the reference."""
    return precision(device) if device.type == "cuda" else "fp32"


@cache
def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def weights_id(weights: str | None) -> str | None:
    """What identifies an encoder's weights: a local checkpoint's hash, else the name or tag as given."""
    if weights is not None and Path(weights).is_file():
        return file_digest(str(Path(weights).resolve()))
    return weights
