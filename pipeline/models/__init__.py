"""The two model architectures, and the model directory that holds a trained model.

  viclipcap  frozen CLIP embedding -> trained mapping network -> frozen GPT-2
  cnn_lstm   frozen CNN feature grid -> trained LSTM with soft attention (the baseline)

Both present one interface to training, decoding and scoring (`CaptionModel`, in `base`), so
`viclip train|score --model NAME` run the same stage code for every registered model
(`pipeline.core.registry`). Each architecture module (`pipeline.models.<architecture>`) registers itself in
`base.REGISTRY` when imported; this package imports one when a model of it is first built or loaded, so that
the baseline's processes and the comparison never load the LM stack (transformers and peft: seconds a
process). The models import `base`, never this package.

A model directory holds only what was trained:
  *.safetensors  the trained weights (the mapper, or the whole LSTM decoder)
  vocab.json     the baseline's syllable vocabulary
  config.json    what the model is, then how its training went (`ModelSpec`)
  params.yaml    the resolved params of the run that produced it
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core import registry
from pipeline.core.config import Config, parse_section
from pipeline.core.errors import ViclipError
from pipeline.core.registry import Sections
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore
from pipeline.models.base import REGISTRY, Architecture, CaptionModel

FORMAT = "viclip-model/2"
CONFIG = "config.json"


def architecture(name: str) -> Architecture:
    """What builds model `name`: its architecture's module, imported on first use, registered it."""
    kind = registry.model(name).architecture
    if kind not in REGISTRY:
        importlib.import_module(f"{__name__}.{kind}")
    return REGISTRY[kind]


@dataclass(frozen=True)
class ModelSpec:
    """What a model directory's config.json says: what the model is (its name, the store it reads, the params
    sections that define it, the fingerprints a reloaded one must match), then how its training went."""

    name: str
    store: str  # the feature store it was trained on
    sections: Sections  # the params sections that define it, as it reads them (registry.Model.sections)
    # "store": the store's attributes; what else it recorded (CaptionModel.record: its LM's, its datastore's)
    fingerprints: dict[str, Any]
    training: dict[str, Any]  # how training went: epochs, the best one, its validation figure, time, hardware

    @property
    def store_attrs(self) -> dict[str, Any]:
        return self.fingerprints["store"]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.name, "store": self.store,
                "sections": {name: section.model_dump() for name, section in self.sections.items()},
                "fingerprints": self.fingerprints, "training": self.training}


def build_model(name: str, config: Config, records: Sequence[ImageRecord], store: FeatureStore | None,
                attrs: dict[str, Any], device: torch.device) -> CaptionModel:
    """A fresh model `name` as `config` defines it, for training on a store with attributes `attrs` (its
    training split's `records` and `store`)."""
    return architecture(name).build(registry.model(name).sections(config), records, store, attrs, device)


def spec_for(name: str, config: Config, model: CaptionModel, attrs: dict[str, Any],
             training: dict[str, Any]) -> ModelSpec:
    """The spec of model `name`, built under `config` on a store with attributes `attrs`, trained as `training` says."""
    entry = registry.model(name)
    return ModelSpec(name, entry.store, entry.sections(config), {"store": attrs, **model.record()}, training)


def read_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ViclipError(f"{model_dir}: not a model directory (no {CONFIG}; run `viclip train`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") == "viclip-model/1":
            raise ViclipError(f"{path}: written by an older viclip (viclip-model/1), which this one does not read; "
                              f"train it again: viclip train --model {raw.get('model')}")
        if raw.get("format") != FORMAT:
            raise ViclipError(f"{path}: not a viclip model config (format {raw.get('format')!r})")
        if raw.get("model") not in registry.MODELS:
            raise ViclipError(f"{path}: unknown model {raw.get('model')!r}; one of {', '.join(registry.MODELS)}")
        entry = registry.MODELS[raw["model"]]
        if raw.get("store") != entry.store:
            raise ViclipError(f"{path}: key 'store': {raw['model']} reads store {entry.store!r}, not {raw.get('store')!r}")
        # A section from an older viclip (before lm.stop, say) names the key it lacks.
        sections = {key: parse_section(key, value, f"{path} (train again?)") for key, value in raw["sections"].items()}
        if entry.store not in sections:
            raise ViclipError(f"{path}: missing key 'sections.{entry.store}'")
        if "store" not in raw["fingerprints"]:
            raise ViclipError(f"{path}: missing key 'fingerprints.store'")
        return ModelSpec(entry.name, entry.store, sections, dict(raw["fingerprints"]), dict(raw["training"]))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ViclipError(f"{path}: malformed model config ({str(error).splitlines()[0]})") from None


def load_model(model_dir: str | Path, device: torch.device) -> tuple[CaptionModel, ModelSpec]:
    """Rebuild exactly the model that was trained, whichever it is, in eval mode."""
    spec = read_spec(model_dir)
    built = architecture(spec.name)
    # Checked here, not in read_spec: knowing the sections an architecture needs imports it.
    for key in built.required:
        if key not in spec.sections:
            raise ViclipError(f"{Path(model_dir) / CONFIG}: missing key 'sections.{key}'")
    model = built.rebuild(Path(model_dir), spec.sections, spec.store_attrs, device)
    check_record(model, spec, model_dir)  # before the weights: weights that do not fit another LM are a symptom
    model.restore(Path(model_dir))
    return model.eval(), spec


def check_record(model: CaptionModel, spec: ModelSpec, model_dir: str | Path) -> None:
    """Refuse, in one line, a model directory whose recorded LM (or datastore) is not what `model` was built with."""
    for key, now in model.record().items():
        then = spec.fingerprints.get(key) or {}
        differ = [k for k in sorted({*then, *now}) if then.get(k) != now.get(k)]
        if differ:
            raise ViclipError(
                f"{model_dir}: trained against another {key}: "
                + "; ".join(f"{k} was {then.get(k)!r}, now {now.get(k)!r}" for k in differ)
                + ". Train again, or load the one it was trained against"
            )
