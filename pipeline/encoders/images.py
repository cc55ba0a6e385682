"""Decoding image files, and encoding them in batches with decoding in worker processes: the workers hand
over uint8 pixels, which the encoder converts and normalises on its device.

Every image a user hands viclip goes through `open_rgb`: `viclip extract`, `viclip caption` and the
service's uploads alike, so a bad file or a decompression bomb is refused the same way everywhere.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.errors import ViclipError
from pipeline.encoders.base import ImageEncoder


class BadImage(ViclipError):
    """An image that cannot be used: not an image, truncated, or too many pixels to decode safely."""


class ImageTooLarge(BadImage):
    """More pixels than may be decoded: a decompression bomb, or simply too big."""


# Pillow's bomb check only warns between its limit and twice it; the warning is made an error while the
# header is read. warnings.catch_warnings swaps a process-wide filter list, so concurrent openers (the
# service's threads) take turns; only the header is read under the lock, never the pixels.
_opening = threading.Lock()


def open_rgb(source: Path | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully (so truncation shows here) as RGB: greyscale, RGBA, CMYK, palette converted.

    The size is checked before the pixels are decoded: a few kilobytes of PNG can expand to gigabytes.
    `max_pixels` defaults to Pillow's limit (Image.MAX_IMAGE_PIXELS); a missing file raises FileNotFoundError.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with _opening, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLarge(f"too large: {str(error).split(', could be')[0]}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except FileNotFoundError:
        raise
    except OSError as error:  # a directory, a file that cannot be read
        raise BadImage(f"unreadable ({error})") from None
    with image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise ImageTooLarge(f"too large: {width}x{height} = {width * height} pixels, over the limit of {limit}")
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise BadImage(f"unreadable ({error})") from None


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
        except BadImage as error:
            return index, None, str(error)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    bad = [(index, error) for index, pixels, error in items if pixels is None]
    indices = np.array([index for index, _ in good], dtype=np.int64)
    # default_collate stacks a worker's batch straight into shared memory: no copy on the way to the main process.
    pixels = default_collate([p for _, p in good]) if good else None
    return indices, pixels, bad


class _Batches:
    """The loader's batch sampler: `batch_size` at a time of the rows of the current pass. The loader reads it in
    the main process as each pass begins, so persistent workers serve passes over any rows."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.rows: list[int] = []

    def __iter__(self) -> Iterator[list[int]]:
        return (self.rows[start:start + self.batch_size] for start in range(0, len(self.rows), self.batch_size))

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)


class FileLoader:
    """Image files decoded by loader workers that live as long as it does (started by the first pass), then
    encoded on the device; a pass at a time, over any of the files."""

    def __init__(self, encoder: ImageEncoder, paths: Sequence[Path], batch_size: int, num_workers: int,
                 device: torch.device):
        self.encoder, self.device = encoder, device
        self.batches = _Batches(batch_size)
        self.loader = DataLoader(
            ImageFiles(paths, encoder.preprocess),
            batch_sampler=self.batches,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def encode(
        self, rows: Sequence[int] | None = None, description: str = "encode"
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """Yield (indices into the paths, (B, ...) features, [(index, error) of bad files]) per batch of `rows`
        (default: every file, in order). One pass at a time: a pass's rows are read as it begins."""
        self.batches.rows = list(range(len(self.loader.dataset)) if rows is None else rows)
        progress = tqdm(self.loader, desc=description, unit="batch", disable=distributed.progress_disabled())
        for indices, pixels, bad in progress:
            embeddings = self.encoder(pixels.to(self.device, non_blocking=True)).cpu().numpy() if pixels is not None else None
            yield indices, embeddings, bad


def encode_files(
    encoder: ImageEncoder,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    description: str = "encode",
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield (indices into `paths`, (B, ...) features, [(index, error) of bad files]) per batch: one pass."""
    return FileLoader(encoder, paths, batch_size, num_workers, device).encode(description=description)
