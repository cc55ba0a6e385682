"""Frozen image encoders (CLIP for ViCLIPCap, a CNN for the baseline), and batched encoding of image files
with decoding in worker processes."""

from __future__ import annotations

import contextlib
import hashlib
import platform
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm



def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache  # asked at every training step: the hardware does not change
def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices natively (and so faster than fp32): CUDA GPUs from
    Ampere on, CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 would be emulated, and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch exposes the CPU's capabilities only privately; without them, assume none.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def hardware(device: torch.device) -> str:
    """What a run ran on, for the record: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} ({torch.get_num_threads()} threads)"


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


class ImageEncoder(Protocol):
    """A frozen image encoder: how to turn a file into pixels, and pixels into features."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    store_dtype: str  # how its features are stored

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, ...) float32 features."""


def _family(name: str):
    # Imported on demand: each encoder pulls in its own heavy library.
    from pipeline import clip, cnn

    return {"clip": (clip.clip_attrs, clip.load_clip), "cnn": (cnn.cnn_attrs, cnn.load_cnn)}[name]


def encoder_attrs(name: str, config: Any) -> dict[str, Any]:
    """The feature-store attributes encoder `name` (clip or cnn) writes, given its params section."""
    return _family(name)[0](config)


def load_encoder(name: str, config: Any, device: torch.device) -> ImageEncoder:
    """Encoder `name` (clip or cnn), built from its params section, frozen."""
    return _family(name)[1](config, device)


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
