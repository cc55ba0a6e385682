"""The captioner: a trained mapper in front of a frozen LM, and the model directory that holds it.

A model directory holds only what was trained:
  mapper.safetensors  the mapper's weights
  config.json         what to rebuild around them: the LM, the CLIP encoder, the mapper shape
  params.yaml         the resolved params of the run that produced it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ClipConfig, MapperConfig
from pipeline.errors import ViclipError
from pipeline.lm import LanguageModel, load_lm
from pipeline.mapper import build_mapper

FORMAT = "viclip-model/1"
WEIGHTS = "mapper.safetensors"
CONFIG = "config.json"

IGNORE = -100  # label of prefix and padding positions: never id 0, which is a real GPT-2 token


class Captioner(nn.Module):
    def __init__(self, mapper: nn.Module, lm: LanguageModel):
        super().__init__()
        self.mapper = mapper
        # A plain dataclass, not a submodule: the LM is not ours to train or save,
        # so parameters() and state_dict() see the mapper alone.
        self.lm = lm

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) image embeddings -> (B, k, W) prefix embeddings."""
        return self.mapper(embeddings)

    def loss(self, embeddings: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the caption tokens given the prefix.

        tokens, mask: (B, T), right-padded; mask is True on real tokens.
        """
        prefix = self.prefix(embeddings)  # (B, k, W)
        words = self.lm.model.get_input_embeddings()(tokens)  # (B, T, W)
        attention = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1).long()
        # Only positions k-1 .. k+T-2 predict caption tokens: skip the LM head elsewhere.
        logits = self.lm.model(
            inputs_embeds=torch.cat([prefix, words], dim=1),
            attention_mask=attention,
            logits_to_keep=tokens.shape[1] + 1,
        ).logits[:, :-1]  # (B, T, V)
        labels = tokens.masked_fill(~mask, IGNORE)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass(frozen=True)
class ModelSpec:
    """What a model directory's config.json says."""

    name: str
    lm: str
    clip: ClipConfig
    encoder: dict[str, Any]  # feature-store attributes the mapper was trained on
    mapper: MapperConfig
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "model": self.name, "lm": self.lm, "clip": self.clip.model_dump(),
            "encoder": self.encoder, "mapper": self.mapper.model_dump(), **self.extra,
        }


def read_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ViclipError(f"{model_dir}: not a model directory (no {CONFIG}; run `viclip train`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ViclipError(f"{path}: not a viclip model config (format {raw.get('format')!r})")
        known = {"format", "model", "lm", "clip", "encoder", "mapper"}
        return ModelSpec(
            raw["model"], raw["lm"], ClipConfig.model_validate(raw["clip"]), raw["encoder"],
            MapperConfig.model_validate(raw["mapper"]), {k: v for k, v in raw.items() if k not in known},
        )
    except (json.JSONDecodeError, KeyError, ValueError) as error:
        raise ViclipError(f"{path}: malformed model config ({str(error).splitlines()[0]})") from None


def save_mapper(mapper: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in mapper.state_dict().items()}, str(path))


def load_captioner(model_dir: str | Path, device: torch.device) -> tuple[Captioner, ModelSpec]:
    """Rebuild exactly the model that was trained: its LM, its mapper shape, its weights."""
    spec = read_spec(model_dir)
    lm = load_lm(spec.lm, device)
    mapper = build_mapper(spec.mapper, spec.encoder["embedding_dim"], lm.width)
    weights = Path(model_dir) / WEIGHTS
    if not weights.is_file():
        raise ViclipError(f"{weights}: mapper weights missing")
    try:
        mapper.load_state_dict(load_file(str(weights)))
    except RuntimeError as error:
        raise ViclipError(
            f"{weights}: weights do not fit the mapper in {CONFIG} "
            f"({str(error).splitlines()[-1].strip()})"
        ) from None
    return Captioner(mapper.to(device).eval(), lm), spec
