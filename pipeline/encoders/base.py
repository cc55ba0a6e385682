"""What every frozen image encoder offers, the registry the encoders add themselves to, and how a store
names an encoder's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from pipeline.core.devices import Precision, precision
from pipeline.core.errors import ViclipError


Preprocess = Callable[[Image.Image], torch.Tensor]  # RGB image -> (3, H, W) pixels


class ImageEncoder(Protocol):
    """A frozen image encoder: how to turn a file into pixels, and pixels into features."""

    preprocess: Preprocess  # to uint8 pixels
    store_dtype: str  # how its features are stored
    precision: Precision  # how it computes them

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels -> (B, ...) float32 features."""


class Standardise(torch.nn.Module):
    """(B, C, H, W) uint8 pixels -> float32 in [0, 1], less the mean, over the standard deviation, per channel:
    torchvision's ToTensor then Normalize, operation for operation, so the same numbers, on the pixels' device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float().div(255) - self.mean) / self.std


def split_preprocess(transform: Preprocess) -> tuple[Preprocess, Standardise]:
    """An image transform ending in ToTensor, Normalize (torchvision's, as open_clip's is) in two halves: the steps
    on the image then uint8 pixels, for the loader's workers; the rest (`Standardise`), for the device. uint8
    pixels are a quarter of float32's bytes through shared memory, pinned memory and the copy to the device."""
    from torchvision import transforms

    steps = list(getattr(transform, "transforms", [transform]))
    if len(steps) < 2 or not isinstance(steps[-2], transforms.ToTensor) \
            or not isinstance(steps[-1], transforms.Normalize):
        raise ViclipError(f"image preprocess ({', '.join(type(step).__name__ for step in steps)}) does not end in "
                          "ToTensor, Normalize: viclip decodes uint8 pixels and normalises them on the device")
    normalize = steps[-1]
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), Standardise(normalize.mean, normalize.std)


def on_tensors(preprocess: Preprocess) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`split_preprocess`'s first half for a decoded (3, H, W) uint8 RGB tensor, on whatever device it is: for
    images decoded on the device. torchvision's Resize and CenterCrop take tensors as they take images (Resize's
    antialiased bicubic on a tensor is close to Pillow's, not equal), and a conversion to RGB is the decoder's
    own. None where another step stands: it may take images alone."""
    from torchvision import transforms

    kept = []
    for step in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(step, (transforms.Resize, transforms.CenterCrop)):
            kept.append(step)
        elif not (isinstance(step, transforms.PILToTensor) or _to_rgb(step)):
            return None
    return transforms.Compose(kept)


def _to_rgb(step: Preprocess) -> bool:
    """Whether a step is open_clip's conversion to RGB, as its releases write it: a function, or a class."""
    named = getattr(step, "__name__", None) or type(step).__name__
    return named == "_convert_to_rgb" or (named == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB")


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
