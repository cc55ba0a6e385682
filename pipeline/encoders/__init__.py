"""Frozen image encoders (CLIP for ViCLIPCap, a CNN for the baseline), and batched encoding of image files
with decoding in worker processes.

Each encoder module registers itself in `base.REGISTRY` when imported; this package imports them all, so
a name here finds its encoder. The encoders import `base`, never this package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.encoders import clip, cnn  # noqa: F401  (each registers itself)
from pipeline.encoders.base import REGISTRY, ImageEncoder


def encoder_attrs(name: str, config: Any) -> dict[str, Any]:
    """The feature-store attributes encoder `name` (clip or cnn) writes, given its params section."""
    return REGISTRY[name].attrs(config)


def load_encoder(name: str, config: Any, device: torch.device) -> ImageEncoder:
    """Encoder `name` (clip or cnn), built from its params section, frozen."""
    return REGISTRY[name].load(config, device)


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so truncation shows here) as RGB: greyscale, RGBA, CMYK, palette converted."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageFiles(Dataset):
    """Decodes and preprocesses images; a bad file yields its error instead of raising."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return index, self.preprocess(open_rgb(path)), None
        except FileNotFoundError:
            return index, None, "missing"
        except UnidentifiedImageError:
            return index, None, "not an image"
        except (OSError, ValueError, SyntaxError) as error:
            return index, None, f"unreadable ({error})"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    bad = [(index, error) for index, pixels, error in items if pixels is None]
    indices = np.array([index for index, _ in good], dtype=np.int64)
    pixels = torch.stack([p for _, p in good]) if good else None
    return indices, pixels, bad


def encode_files(
    encoder: ImageEncoder,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    description: str = "encode",
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield (indices into `paths`, (B, ...) features, [(index, error) of bad files]) per batch."""
    loader = DataLoader(
        ImageFiles(paths, encoder.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for indices, pixels, bad in tqdm(loader, desc=description, unit="batch", disable=None):
        embeddings = encoder(pixels.to(device, non_blocking=True)).cpu().numpy() if pixels is not None else None
        yield indices, embeddings, bad
