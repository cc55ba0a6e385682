"""The frozen CLIP image encoder, and batched image encoding with decoding in worker processes."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.config import ClipConfig
from pipeline.errors import ViclipError


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache
def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def pretrained_id(config: ClipConfig) -> str:
    """What identifies the weights: the open_clip tag, or the hash of a local checkpoint."""
    path = Path(config.pretrained)
    return file_digest(str(path.resolve())) if path.is_file() else config.pretrained


def clip_attrs(config: ClipConfig) -> dict[str, Any]:
    """The store attributes that say which CLIP produced the embeddings."""
    return {
        "encoder": "clip",
        "model": config.model,
        "pretrained": pretrained_id(config),
        "normalized": config.normalize,
    }


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    normalize: bool

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D) float32 embeddings."""
        device = images.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeddings = self.model.encode_image(images).float()
        if self.normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        return embeddings


def load_clip(config: ClipConfig, device: torch.device) -> ClipEncoder:
    """The CLIP image tower, frozen; fails in one line when its weights can't be had."""
    import open_clip  # heavy: imported only by the stages that run CLIP

    if config.config is not None:
        if not Path(config.config).is_file():
            raise ViclipError(f"{config.config}: CLIP architecture file not found (clip.config)")
        open_clip.add_model_config(config.config)
    if config.model not in open_clip.list_models():
        raise ViclipError(f"clip.model: unknown open_clip architecture {config.model!r}")
    logging.disable(logging.ERROR)  # open_clip logs the failure itself; ours is the one line shown
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.model, pretrained=config.pretrained, device=device
        )
    except (RuntimeError, OSError) as error:
        if Path(config.pretrained).is_file():
            raise ViclipError(f"{config.pretrained}: not a checkpoint for {config.model} ({error})") from None
        raise ViclipError(
            f"could not fetch CLIP weights {config.model}/{config.pretrained} (no network?); "
            "download them elsewhere and set clip.pretrained in params.yaml to the local checkpoint file"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    model.requires_grad_(False).eval()
    return ClipEncoder(model, preprocess, config.normalize)


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
    encoder: ClipEncoder,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    description: str = "encode",
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield (indices into `paths`, (B, D) embeddings, [(index, error) of bad files]) per batch."""
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
