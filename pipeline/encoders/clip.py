"""ViCLIPCap's image encoder: a frozen open_clip image tower, one embedding per image."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.core.config import ClipConfig
from pipeline.core.devices import Precision, autocast
from pipeline.core.errors import ViclipError
from pipeline.encoders.base import (
    EncoderFamily, Standardise, encoding_precision, register, split_preprocess, weights_id,
)


def clip_attrs(config: ClipConfig) -> dict[str, Any]:
    """The store attributes that say which CLIP produced the embeddings."""
    return {
        "encoder": "clip",
        "model": config.model,
        "pretrained": weights_id(config.pretrained),
        "normalized": config.normalize,
    }


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]  # RGB image -> (3, H, W) uint8 pixels, in loader workers
    standardise: Standardise  # the rest of open_clip's transform, on the model's device
    normalize: bool
    precision: Precision
    store_dtype = "float32"

    @classmethod
    def frozen(cls, model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor], normalize: bool,
               device: torch.device) -> ClipEncoder:
        """`model` (on `device`) frozen, with open_clip's image `transform` split between the loader and the device."""
        preprocess, standardise = split_preprocess(transform)
        return cls(model.requires_grad_(False).eval(), preprocess, standardise.to(device), normalize,
                   encoding_precision(device))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels -> (B, D) float32 embeddings."""
        device = images.device
        pixels = self.standardise(images)
        with autocast(device, self.precision):
            embeddings = self.model.encode_image(pixels).float()
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
    return ClipEncoder.frozen(model, preprocess, config.normalize, device)


register("clip", EncoderFamily(clip_attrs, load_clip))
