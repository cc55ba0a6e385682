"""Frozen image encoders: CLIP for ViCLIPCap, a CNN for the baseline. `images` decodes image files and
encodes them in batches.

Each encoder module registers its family (clip, cnn) in `base.REGISTRY` when imported; this package imports
them all. A feature store names the family that writes it (`pipeline.core.registry.STORES`). The encoders
import `base`, never this package.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.encoders import clip, cnn  # noqa: F401  (each registers itself)
from pipeline.encoders.base import REGISTRY, ImageEncoder


def encoder_attrs(encoder: str, settings: Any) -> dict[str, Any]:
    """The feature-store attributes encoder family `encoder` writes, given its settings (a store's section)."""
    return REGISTRY[encoder].attrs(settings)


def load_encoder(encoder: str, settings: Any, device: torch.device) -> ImageEncoder:
    """Encoder family `encoder`, built from its settings (a store's section), frozen."""
    return REGISTRY[encoder].load(settings, device)
