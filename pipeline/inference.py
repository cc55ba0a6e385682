"""Captioning new image files with a trained model: CLIP, mapper and LM in one pass, many images at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import paths
from pipeline.captioner import load_captioner
from pipeline.config import Config
from pipeline.decoding import caption_embeddings
from pipeline.encoders import best_device, clip_attrs, encode_files, load_clip
from pipeline.errors import ViclipError


def caption_files(config: Config, images: list[Path], model_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(path, caption) per image, in the order given; decoding settings from the score section."""
    model_dir = model_dir or paths.model_dir(config)
    device = best_device()
    captioner, spec = load_captioner(model_dir, device)
    # The model names the CLIP it was trained on; refuse other weights under the same name.
    encoder = load_clip(spec.clip, device)
    recorded = {key: spec.encoder.get(key) for key in clip_attrs(spec.clip)}
    if clip_attrs(spec.clip) != recorded:
        raise ViclipError(f"{spec.clip.pretrained}: not the CLIP checkpoint {model_dir} was trained on")

    embeddings = np.zeros((len(images), spec.encoder["embedding_dim"]), dtype=np.float32)
    bad: list[tuple[int, str]] = []
    for rows, batch, errors in encode_files(encoder, images, config.score.batch_size, 0, device, "encode"):
        if len(rows):
            embeddings[rows] = batch
        bad += errors
    if bad:
        raise ViclipError(f"{len(bad)} bad image(s): " + "; ".join(f"{images[i]} ({e})" for i, e in sorted(bad)))
    captions = caption_embeddings(captioner, torch.from_numpy(embeddings).to(device), config.score)
    return list(zip(images, captions))
