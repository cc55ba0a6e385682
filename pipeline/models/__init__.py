"""The two captioning models, and the model directory that holds a trained one.

  viclipcap  frozen CLIP embedding -> trained mapping network -> frozen GPT-2
  cnn_lstm   frozen CNN feature grid -> trained LSTM with soft attention (the baseline)

Both present one interface to training, decoding and scoring (`CaptionModel`, in
`base`), so `viclip train|score --model NAME` run the same stage code for either.
Each model module registers its `Family` in `base.REGISTRY` when imported; this
package imports them all. The models import `base`, never this package.

A model directory holds only what was trained:
  *.safetensors  the trained weights (the mapper, or the whole LSTM decoder)
  vocab.json     the baseline's syllable vocabulary
  config.json    what to rebuild around them: the feature-store attributes the
                 model was trained on, the params sections that define it, what
                 else a reloaded model must match (ViCLIPCap: the LM's
                 fingerprint), and how training went
  params.yaml    the resolved params of the run that produced it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from pipeline.core.config import Config, parse_section
from pipeline.core.errors import ViclipError
from pipeline.core.names import MODELS
from pipeline.models import cnn_lstm, viclipcap  # noqa: F401  (each registers itself)
from pipeline.models.base import REGISTRY, CaptionModel, Family

FORMAT = "viclip-model/1"
CONFIG = "config.json"


def family(name: str) -> Family:
    if name not in MODELS:
        raise ViclipError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return REGISTRY[name]


@dataclass(frozen=True)
class ModelSpec:
    """What a model directory's config.json says."""

    name: str
    encoder: dict[str, Any]  # feature-store attributes the model was trained on
    sections: dict[str, BaseModel | None]  # the params sections that define the model; None: not used
    extra: dict[str, Any]  # how training went

    def to_json(self) -> dict[str, Any]:
        sections = {name: section and section.model_dump() for name, section in self.sections.items()}
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
        recipe = family(raw["model"])
        names = recipe.sections
        # A section from an older viclip (before lm.stop, say) names the key it lacks.
        sections = {name: None if name in recipe.optional and raw.get(name, {}) is None
                    else parse_section(name, raw.get(name), f"{path} (train again?)") for name in names}
        known = {"format", "model", "encoder", *names}
        return ModelSpec(raw["model"], raw["encoder"], sections, {k: v for k, v in raw.items() if k not in known})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ViclipError(f"{path}: malformed model config ({str(error).splitlines()[0]})") from None


def spec_for(name: str, config: Config, encoder: dict[str, Any], extra: dict[str, Any]) -> ModelSpec:
    """The spec of model `name` trained under `config` (as the model reads it) on a store with attributes `encoder`."""
    return ModelSpec(name, encoder, {s: getattr(config, s) for s in family(name).sections}, extra)


def load_model(model_dir: str | Path, device: torch.device) -> tuple[CaptionModel, ModelSpec]:
    """Rebuild exactly the model that was trained, whichever it is, in eval mode."""
    spec = read_spec(model_dir)
    model = family(spec.name).rebuild(Path(model_dir), spec.sections, spec.encoder, device)
    check_record(model, spec, model_dir)  # before the weights: weights that do not fit another LM are a symptom
    model.restore(Path(model_dir))
    return model.eval(), spec


def check_record(model: CaptionModel, spec: ModelSpec, model_dir: str | Path) -> None:
    """Refuse, in one line, a model directory whose recorded LM (or datastore) is not what `model` was built with."""
    for key, now in model.record().items():
        then = spec.extra.get(key) or {}
        differ = [k for k in sorted({*then, *now}) if then.get(k) != now.get(k)]
        if differ:
            raise ViclipError(
                f"{model_dir}: trained against another {key.removesuffix('_fingerprint')}: "
                + "; ".join(f"{k} was {then.get(k)!r}, now {now.get(k)!r}" for k in differ)
                + ". Train again, or load the one it was trained against"
            )
