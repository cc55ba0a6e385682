"""Decoding image files, and encoding them in batches with decoding in worker processes: the workers hand
over uint8 pixels, which the encoder converts and normalises on its device. On a GPU they hand over JPEG files
undecoded instead, and the GPU decodes them (`DeviceJpegs`); any other image the workers decode still.

Every image a user hands viclip goes through `open_rgb`: `viclip extract`, `viclip caption` and the
service's uploads alike, so a bad file or a decompression bomb is refused the same way everywhere.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.devices import jpegs_on_device
from pipeline.core.errors import ViclipError
from pipeline.encoders.base import ImageEncoder, on_tensors


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
    with _opened(source, max_pixels) as image:
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise BadImage(f"unreadable ({error})") from None


def jpeg_bytes(path: Path, max_pixels: int | None = None) -> torch.Tensor | None:
    """A JPEG file's bytes (a 1-D uint8 tensor) for a decoder on the device, once its header passes `open_rgb`'s
    checks; None for any other image, for CMYK JPEGs (the device decodes RGB and greyscale), and for a file that
    does not end in JPEG's end-of-image marker, truncated or trailed by other data, whose fate the workers'
    Pillow decides as it does on a CPU. Unlike `open_rgb`, no pixel is decoded."""
    with _opened(path, max_pixels) as image:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
    data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data.endswith(b"\xff\xd9") else None


def _opened(source: Path | BinaryIO, max_pixels: int | None) -> Image.Image:
    """The image with its header read and its size checked, no pixel decoded; the errors `open_rgb` states."""
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
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ImageTooLarge(f"too large: {width}x{height} = {width * height} pixels, over the limit of {limit}")
    return image


@dataclass
class JpegFile:
    """A JPEG file handed over undecoded, for the device to decode: its bytes, a 1-D uint8 tensor."""

    data: torch.Tensor


class ImageFiles(Dataset):
    """Decodes and preprocesses images; a bad file yields its error instead of raising. With `jpegs_undecoded`
    (decoding on the device: `DeviceJpegs`), a JPEG file `jpeg_bytes` takes is handed over as its bytes."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor],
                 jpegs_undecoded: bool = False):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.jpegs_undecoded = jpegs_undecoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | JpegFile | None, str | None]:
        """(index, (3, H, W) uint8 pixels or a JPEG file, None) or (index, None, the error)."""
        return self.item(index, self.jpegs_undecoded)

    def item(self, index: int, jpegs_undecoded: bool) -> tuple[int, torch.Tensor | JpegFile | None, str | None]:
        path = self.paths[index]
        try:
            if jpegs_undecoded and (data := jpeg_bytes(path)) is not None:
                return index, JpegFile(data), None
            return index, self.preprocess(open_rgb(path)), None
        except FileNotFoundError:
            return index, None, "missing"
        except BadImage as error:
            return index, None, str(error)


class DeviceJpegs:
    """JPEG files' bytes decoded on the device (nvJPEG on a GPU, through torchvision), then resized and cropped
    there as the encoder's preprocess does it on the host (`base.on_tensors`)."""

    def __init__(self, resize: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.resize, self.device = resize, device

    def __call__(self, files: list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels on the device; RuntimeError where a file does not decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)
        return torch.stack([self.resize(image) for image in images])


def device_jpegs(encoder: ImageEncoder, device: torch.device) -> DeviceJpegs | None:
    """Where JPEG files are decoded on the device (`devices.jpegs_on_device`, and an encoder whose preprocess
    takes tensors), its decoder; None where Pillow decodes them in the loader's workers."""
    resize = on_tensors(encoder.preprocess)
    return DeviceJpegs(resize, device) if resize is not None and jpegs_on_device(device) else None


def jpeg_decoder(encoder: ImageEncoder, device: torch.device) -> str:
    """What decodes JPEG files, for a store's attributes: Pillow, or torchvision on the device."""
    return f"torchvision on {device.type}" if device_jpegs(encoder, device) else "pillow"


def _collate(items: list[tuple[int, torch.Tensor | JpegFile | None, str | None]]):
    """(indices, the images decoded in the worker stacked or None, [(index, a JPEG file's bytes)], the bad)."""
    good = [(index, pixels) for index, pixels, _ in items if isinstance(pixels, torch.Tensor)]
    jpegs = [(index, file.data) for index, file, _ in items if isinstance(file, JpegFile)]
    bad = [(index, error) for index, pixels, error in items if pixels is None]
    indices = np.array([index for index, _ in good], dtype=np.int64)
    # default_collate stacks a worker's batch straight into shared memory: no copy on the way to the main process.
    pixels = default_collate([p for _, p in good]) if good else None
    return indices, pixels, jpegs, bad


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
    """Image files decoded by loader workers that live as long as it does (started by the first pass), or, for
    JPEG files where `device_jpegs` says so, on the device; then encoded on the device; a pass at a time, over
    any of the files."""

    def __init__(self, encoder: ImageEncoder, paths: Sequence[Path], batch_size: int, num_workers: int,
                 device: torch.device):
        self.encoder, self.device = encoder, device
        self.jpegs = device_jpegs(encoder, device)
        self.batches = _Batches(batch_size)
        self.loader = DataLoader(
            ImageFiles(paths, encoder.preprocess, jpegs_undecoded=self.jpegs is not None),
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
        for indices, pixels, jpegs, bad in progress:
            if pixels is not None:
                pixels = pixels.to(self.device, non_blocking=True)
            if jpegs:
                indices, pixels, failed = self._join(indices, pixels, jpegs)
                bad = sorted(bad + failed)
            embeddings = self.encoder(pixels).cpu().numpy() if pixels is not None else None
            yield indices, embeddings, bad

    def _join(self, indices: np.ndarray, pixels: torch.Tensor | None, jpegs: list[tuple[int, torch.Tensor]]):
        """The batch's JPEG files decoded on the device, joined to the workers' pixels in the batch's order. A file
        the device cannot decode fails the whole call: the batch's JPEG files are then decoded here as the workers
        decode them, each good one's pixels kept and each bad one's error reported."""
        try:
            rows, decoded, failed = [index for index, _ in jpegs], self.jpegs([data for _, data in jpegs]), []
        except RuntimeError:
            items = [self.loader.dataset.item(index, jpegs_undecoded=False) for index, _ in jpegs]
            rows = [index for index, _, error in items if error is None]
            failed = [(index, error) for index, _, error in items if error is not None]
            decoded = torch.stack([p for _, p, error in items if error is None]).to(self.device) if rows else None
        parts = [part for part in (pixels, decoded) if part is not None]
        if not parts:
            return indices, None, failed
        joined = np.concatenate([indices, np.array(rows, dtype=np.int64)])
        order = np.argsort(joined, kind="stable")
        return joined[order], torch.cat(parts)[torch.from_numpy(order).to(self.device)], failed


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
