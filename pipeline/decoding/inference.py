"""Captioning new images with a trained model: its encoder, then the model, many images at once.

A `LoadedModel` holds a trained model and the encoder it was trained on, loaded once; `viclip caption`
uses one for a list of files, and `viclip serve` keeps one per model for the life of the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pipeline.core import registry
from pipeline.core.config import Config, ScoreConfig
from pipeline.core.devices import best_device
from pipeline.core.errors import ViclipError
from pipeline.decoding.beam import Captions, caption_features
from pipeline.encoders import encoder_attrs, load_encoder
from pipeline.encoders.base import ImageEncoder
from pipeline.encoders.images import encode_files
from pipeline.models import ModelSpec, load_model
from pipeline.models.base import CaptionModel


@dataclass
class LoadedModel:
    """A trained model in eval mode, and the frozen encoder whose features it was trained on."""

    model_dir: Path
    model: CaptionModel
    spec: ModelSpec
    encoder: ImageEncoder  # the encoder of the store it was trained on
    device: torch.device

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device) -> LoadedModel:
        model, spec = load_model(model_dir, device)
        # The model names the store it was trained on; refuse an encoder that would write another one.
        family, settings = registry.STORES[spec.store].encoder, spec.sections[spec.store]
        encoder = load_encoder(family, settings, device)
        for key, value in encoder_attrs(family, settings).items():
            if spec.store_attrs.get(key) != value:
                raise ViclipError(f"{model_dir}: trained on store {spec.store} with {key}={spec.store_attrs.get(key)!r}, "
                                  f"but {value!r} is what loads now")
        return cls(Path(model_dir), model, spec, encoder, device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """RGB image -> (3, H, W) uint8 pixels, as the encoder expects them."""
        return self.encoder.preprocess

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, settings: ScoreConfig) -> Captions:
        """(N, 3, H, W) uint8 pixels -> N captions: one encoder call, then batched beam search."""
        features = self.encoder(pixels.to(self.device)).float()
        return caption_features(self.model, features, settings, description=None)

    def caption_files(self, images: list[Path], settings: ScoreConfig) -> list[str]:
        """A caption per image file, in the order given; every bad file is named in one error."""
        features: np.ndarray | None = None
        bad: list[tuple[int, str]] = []
        for rows, batch, errors in encode_files(self.encoder, images, settings.batch_size, 0, self.device, "encode"):
            if len(rows):
                if features is None:
                    features = np.zeros((len(images), *batch.shape[1:]), dtype=np.float32)
                features[rows] = batch
            bad += errors
        if bad:
            raise ViclipError(f"{len(bad)} bad image(s): " + "; ".join(f"{images[i]} ({e})" for i, e in sorted(bad)))
        return caption_features(self.model, torch.from_numpy(features).to(self.device), settings).texts


def caption_files(config: Config, images: list[Path], model_dir: Path) -> list[tuple[Path, str]]:
    """(path, caption) per image, in the order given; decoding settings from the score section."""
    loaded = LoadedModel.load(model_dir, best_device())
    return list(zip(images, loaded.caption_files(images, config.score)))
