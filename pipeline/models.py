"""The two captioning models, and the model directory that holds a trained one.

  viclipcap  frozen CLIP embedding -> trained mapping network -> frozen GPT-2
  cnn_lstm   frozen CNN feature grid -> trained LSTM with soft attention (the baseline)

Both present one interface to training, decoding and scoring (`CaptionModel`),
so `viclip train|score --model NAME` run the same stage code for either.

A model directory holds only what was trained:
  *.safetensors  the trained weights (the mapper, or the whole LSTM decoder)
  vocab.json     the baseline's syllable vocabulary
  config.json    what to rebuild around them: the feature-store attributes the
                 model was trained on, the params sections that define it, and
                 how training went
  params.yaml    the resolved params of the run that produced it
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import Config
from pipeline.data import ImageRecord
from pipeline.errors import ViclipError
from pipeline.paths import MODELS

FORMAT = "viclip-model/1"
CONFIG = "config.json"

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CaptionModel(nn.Module):
    """What training, decoding and scoring need from a model. Its parameters() are what is trained."""

    eos_token_id: int
    max_tokens: int | None  # the longest caption (end-of-text included) it can learn; None: no limit

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption, closed by end-of-text."""
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def loss(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training loss of right-padded (B, T) tokens given (B, ...) image features; mask marks real tokens."""
        raise NotImplementedError

    def start_decoding(self, features: torch.Tensor, beams: int) -> tuple[torch.Tensor, Step]:
        """(N, V) logits of each image's first token, and step(rows, tokens) -> (N * beams, V) logits of
        the next: row r continues the beam in row rows[r] of the previous step with token tokens[r]."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write the trained weights, and whatever else rebuilds the model, into `directory`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Family:
    """One model's recipe: what it reads, what defines it, how to build it fresh and load it trained."""

    encoder: str  # the feature store it reads: clip or cnn
    sections: tuple[str, ...]  # the params sections that define it, recorded in config.json
    build: Callable[[Config, Sequence[ImageRecord], dict[str, Any], torch.device], CaptionModel]
    load: Callable[[Path, dict[str, BaseModel], dict[str, Any], torch.device], CaptionModel]


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def save_weights(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def load_weights(module: nn.Module, path: Path) -> None:
    """Load `path` into `module`, refusing weights of another shape in one line."""
    if not path.is_file():
        raise ViclipError(f"{path}: weights missing")
    try:
        module.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ViclipError(
            f"{path}: weights do not fit the model in config.json ({str(error).splitlines()[-1].strip()})"
        ) from None


def _families() -> dict[str, Family]:
    from pipeline import captioner, cnn_lstm

    return {
        "viclipcap": Family("clip", ("clip", "lm", "mapper"), captioner.build, captioner.load),
        "cnn_lstm": Family("cnn", ("cnn", "lstm"), cnn_lstm.build, cnn_lstm.load),
    }


def family(name: str) -> Family:
    if name not in MODELS:
        raise ViclipError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return _families()[name]


@dataclass(frozen=True)
class ModelSpec:
    """What a model directory's config.json says."""

    name: str
    encoder: dict[str, Any]  # feature-store attributes the model was trained on
    sections: dict[str, BaseModel]  # the params sections that define the model
    extra: dict[str, Any]  # how training went

    def to_json(self) -> dict[str, Any]:
        sections = {name: section.model_dump() for name, section in self.sections.items()}
        return {"format": FORMAT, "model": self.name, "encoder": self.encoder, **sections, **self.extra}


def read_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ViclipError(f"{model_dir}: not a model directory (no {CONFIG}; run `viclip train`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ViclipError(f"{path}: not a viclip model config (format {raw.get('format')!r})")
        if raw["model"] not in MODELS:
            raise ViclipError(f"{path}: unknown model {raw['model']!r}")
        names = family(raw["model"]).sections
        sections = {name: Config.model_fields[name].annotation.model_validate(raw[name]) for name in names}
        known = {"format", "model", "encoder", *names}
        return ModelSpec(raw["model"], raw["encoder"], sections, {k: v for k, v in raw.items() if k not in known})
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as error:
        raise ViclipError(f"{path}: malformed model config ({str(error).splitlines()[0]})") from None


def spec_for(name: str, config: Config, encoder: dict[str, Any], extra: dict[str, Any]) -> ModelSpec:
    """The spec of model `name` trained under `config` on a store with attributes `encoder`."""
    return ModelSpec(name, encoder, {s: getattr(config, s) for s in family(name).sections}, extra)


def load_model(model_dir: str | Path, device: torch.device) -> tuple[CaptionModel, ModelSpec]:
    """Rebuild exactly the model that was trained, whichever it is, in eval mode."""
    spec = read_spec(model_dir)
    model = family(spec.name).load(Path(model_dir), spec.sections, spec.encoder, device)
    return model, spec
