"""What training, decoding and scoring need from a caption model (`CaptionModel`), the registry each
architecture adds itself to (`Architecture`), and the weight files of a model directory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from pipeline.core.errors import ViclipError
from pipeline.core.registry import Sections
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CaptionModel(nn.Module):
    """What training, decoding and scoring need from a model. Its parameters() are what is trained."""

    stop_id: int  # the token that ends a caption
    banned_ids: tuple[int, ...]  # tokens that can never be a caption's: decoding never produces them
    max_tokens: int | None  # the longest caption (stop included) it can learn or decode; None: no limit
    compiles = False  # whether torch.compile traces its training forward whole (`CrossEntropy.compile`), and its decoding step

    def record(self) -> dict[str, Any]:
        """What else the model directory's config.json records, and a reloaded model must match."""
        return {}

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption, closed by the stop token."""
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def loss(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training loss of right-padded (B, T) tokens given (B, ...) image features; mask marks real tokens."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss: DistributedDataParallel exchanges gradients only for what runs through forward.
        `weights` (B,), where a model supports them, weight each caption's tokens (self-critical training)."""
        if weights is None:
            return self.loss(features, tokens, mask)
        return self.loss(features, tokens, mask, weights)

    def start_decoding(self, features: torch.Tensor, beams: int, length: int | None = None) -> tuple[torch.Tensor, Step]:
        """(N, V) logits of each image's first token, and step(rows, tokens) -> (N * beams, V) logits of
        the next: row r continues the beam in row rows[r] of the previous step with token tokens[r]. `length`,
        where given, bounds the tokens a caption takes: a model may preallocate its decoding state for it."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write the trained weights, and whatever else rebuilds the model, into `directory`."""
        raise NotImplementedError

    def restore(self, directory: Path) -> None:
        """Load the trained weights that `save` wrote into `directory`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Architecture:
    """How to build one kind of model fresh for training, and rebuild a trained one's shape from its model
    directory (its weights are then `restore`d); each from the params sections that define the model
    (`registry.Model.sections`) and the attributes of the store it reads."""

    required: tuple[str, ...]  # the sections it cannot be built without, besides its store's
    # From the training split (its records and its feature store) as well.
    build: Callable[[Sections, Sequence[ImageRecord], FeatureStore | None, dict[str, Any], torch.device], CaptionModel]
    rebuild: Callable[[Path, Sections, dict[str, Any], torch.device], CaptionModel]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """What training changes: parameters can be frozen (a LoRA-adapted LM's own weights)."""
    return [p for p in module.parameters() if p.requires_grad]


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in trainable(module))


def _frozen(module: nn.Module) -> set[str]:
    # Every name of a tied tensor (GPT-2's input and output embeddings share one).
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training changes: the state dict less frozen parameters, which for a LoRA-adapted LM
    are its base weights (hundreds of MB a checkpoint need not hold)."""
    frozen = _frozen(module)
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if k not in frozen}


def load_trained_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `trained_state` copied; every entry but the frozen parameters must be there."""
    result = module.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - _frozen(module)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"trained state does not fit the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(result.unexpected_keys)}")


def save_weights(module: nn.Module, path: Path) -> None:
    """`module`'s state dict; a tensor held under two names (GPT-2's tied input and output embeddings,
    which safetensors' plain `save_file` refuses) is written once."""
    save_model(module, str(path))


def load_weights(module: nn.Module, path: Path, load: Callable[[nn.Module, str], object] = load_model) -> None:
    """Load `path` into `module` with `load` (by default what `save_weights` wrote, the tied names
    re-joined), refusing weights of another shape in one line. `load` raises RuntimeError on a mismatch."""
    if not path.is_file():
        raise ViclipError(f"{path}: weights missing")
    try:
        load(module, str(path))
    except RuntimeError as error:
        raise ViclipError(
            f"{path}: weights do not fit the model in config.json ({str(error).splitlines()[-1].strip()})"
        ) from None


REGISTRY: dict[str, Architecture] = {}  # filled by each model module as it is imported


def register(name: str, architecture: Architecture) -> None:
    REGISTRY[name] = architecture
