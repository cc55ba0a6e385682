"""The baseline's image encoder: a frozen ImageNet CNN from torchvision, a grid of features per image.

The classifier head is dropped; the last feature map is average-pooled to a
fixed grid (7 x 7 for ResNet-101 at 224 pixels: its native size), so each image
becomes `grid * grid` positions of C features for the LSTM to attend over.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from pipeline.core.config import CnnConfig
from pipeline.core.devices import Precision, autocast
from pipeline.core.errors import ViclipError
from pipeline.encoders.base import (
    EncoderFamily, Standardise, encoding_precision, register, split_preprocess, weights_id,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"  # the weights attribute of a randomly initialised CNN (seeded, so reproducible)


def cnn_attrs(config: CnnConfig) -> dict[str, Any]:
    """The store attributes that say which CNN produced the features, and how."""
    return {
        "encoder": "cnn",
        "model": config.model,
        "weights": weights_id(config.weights) or RANDOM,
        "image_size": config.image_size,
        "grid": config.grid,
    }


@dataclass
class CnnEncoder:
    trunk: nn.Module  # the CNN without its pooling and classifier
    grid: int
    preprocess: Callable[[Image.Image], torch.Tensor]  # RGB image -> (3, S, S) uint8 pixels, in loader workers
    standardise: Standardise  # to ImageNet's statistics, on the trunk's device
    precision: Precision
    # A 7 x 7 x 2048 grid is 400 KB per image in float32; half precision halves the store and
    # what training keeps on the device, and is far finer than the LSTM can make use of.
    store_dtype = "float16"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 pixels -> (B, grid * grid, C) float32 features."""
        device = images.device
        pixels = self.standardise(images)
        with autocast(device, self.precision):
            maps = self.trunk(pixels)  # (B, C, h, w)
        grid = nn.functional.adaptive_avg_pool2d(maps.float(), self.grid)  # (B, C, grid, grid)
        return grid.flatten(2).transpose(1, 2).contiguous()


def _trunk(model: nn.Module, name: str) -> nn.Module:
    if hasattr(model, "features"):  # VGG, DenseNet, EfficientNet, MobileNet, ConvNeXt
        return model.features
    if hasattr(model, "avgpool") and hasattr(model, "fc"):  # ResNet, ResNeXt, Wide ResNet, RegNet
        return nn.Sequential(*list(model.children())[:-2])
    raise ViclipError(f"cnn.model: {name!r} has no convolutional trunk viclip knows (ResNet family or `.features`)")


def _weights(config: CnnConfig) -> dict[str, torch.Tensor]:
    """The state dict cnn.weights names: a local checkpoint file, or torchvision weights (downloaded once)."""
    import torchvision
    from safetensors.torch import load_file

    path = Path(config.weights)
    if path.is_file():
        try:
            return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        except (RuntimeError, OSError, ValueError) as error:
            raise ViclipError(f"{path}: unreadable checkpoint ({str(error).splitlines()[0]})") from None
    available = torchvision.models.get_model_weights(config.model)
    if config.weights not in available.__members__:
        raise ViclipError(
            f"cnn.weights: {config.weights!r} is neither a file nor a weights name of {config.model} "
            f"({', '.join(available.__members__)})"
        )
    try:
        # torch.hub reports its download attempt on stdout; ours is the one line shown.
        with contextlib.redirect_stdout(io.StringIO()):
            return available[config.weights].get_state_dict(progress=False)
    except (OSError, RuntimeError):
        raise ViclipError(
            f"could not fetch CNN weights {config.model}/{config.weights} (no network?); "
            "download them elsewhere and set cnn.weights in params.yaml to the local checkpoint file"
        ) from None


def build_trunk(config: CnnConfig) -> nn.Module:
    """The trunk of the torchvision classifier cnn.model, with cnn.weights loaded; fails in one line."""
    import torchvision

    if config.model not in torchvision.models.list_models(module=torchvision.models):
        raise ViclipError(f"cnn.model: unknown torchvision classification model {config.model!r}")
    # Random weights (cnn.weights null) are still reproducible, without reseeding the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(config.model, weights=None)
    trunk = _trunk(model, config.model)  # checked before any weights are fetched
    if config.weights is not None:
        try:
            model.load_state_dict(_weights(config))
        except RuntimeError as error:
            raise ViclipError(
                f"{config.weights}: not weights for {config.model} ({str(error).splitlines()[0].strip()})"
            ) from None
    return trunk


def load_cnn(config: CnnConfig, device: torch.device) -> CnnEncoder:
    """The CNN trunk, frozen (no gradients, eval mode: batch-norm statistics never move)."""
    from torchvision import transforms

    trunk = build_trunk(config).requires_grad_(False).eval().to(device)
    preprocess, standardise = split_preprocess(transforms.Compose([
        # Squashed, not cropped: a caption may mention anything in the frame.
        transforms.Resize((config.image_size, config.image_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))
    return CnnEncoder(trunk, config.grid, preprocess, standardise.to(device), encoding_precision(device))


register("cnn", EncoderFamily(cnn_attrs, load_cnn))
