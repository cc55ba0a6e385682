"""Frozen image encoders: CLIP for ViCLIPCap, a CNN for the baseline. `images` decodes image files and
encodes them in batches.

Each encoder module registers itself in `base.REGISTRY` when imported; this package imports them all, so
a name here finds its encoder. The encoders import `base`, never this package.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.core.names import ENCODERS
from pipeline.encoders import clip, cnn  # noqa: F401  (each registers itself)
from pipeline.encoders.base import REGISTRY, ImageEncoder


def encoder_attrs(name: str, config: Any) -> dict[str, Any]:
    """The feature-store attributes encoder `name` (a store of names.ENCODERS) writes, given its params section."""
    return REGISTRY[ENCODERS[name]].attrs(config)


def load_encoder(name: str, config: Any, device: torch.device) -> ImageEncoder:
    """Encoder `name` (a store of names.ENCODERS), built from its params section, frozen."""
    return REGISTRY[ENCODERS[name]].load(config, device)
