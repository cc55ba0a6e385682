"""Captioning new image files with a trained model: its encoder, then the model, many images at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.decoding import caption_features
from pipeline.devices import best_device
from pipeline.encoders import encode_files, encoder_attrs, load_encoder
from pipeline.errors import ViclipError
from pipeline.models import family, load_model


def caption_files(config: Config, images: list[Path], model_dir: Path) -> list[tuple[Path, str]]:
    """(path, caption) per image, in the order given; decoding settings from the score section."""
    device = best_device()
    model, spec = load_model(model_dir, device)
    # The model names the encoder it was trained on; refuse other weights under the same name.
    name = family(spec.name).encoder
    section = spec.sections[name]
    encoder = load_encoder(name, section, device)
    attrs = encoder_attrs(name, section)
    for key, value in attrs.items():
        if spec.encoder.get(key) != value:
            raise ViclipError(
                f"{model_dir}: trained on {name} {key}={spec.encoder.get(key)!r}, but {value!r} is what loads now"
            )

    features: np.ndarray | None = None
    bad: list[tuple[int, str]] = []
    for rows, batch, errors in encode_files(encoder, images, config.score.batch_size, 0, device, "encode"):
        if len(rows):
            if features is None:
                features = np.zeros((len(images), *batch.shape[1:]), dtype=np.float32)
            features[rows] = batch
        bad += errors
    if bad:
        raise ViclipError(f"{len(bad)} bad image(s): " + "; ".join(f"{images[i]} ({e})" for i, e in sorted(bad)))
    captions = caption_features(model, torch.from_numpy(features).to(device), config.score)
    return list(zip(images, captions.texts))
