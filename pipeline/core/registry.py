"""The feature stores and the models, by name: the one list of each.

Everything that lists models or stores reads it: the CLI's choices, params.yaml's store sections and per-model
training sections (`config`), `start_from`'s choices, the report's names and order, the demo's stores, the
benchmarks and dvc.yaml (`pipeline.workflow`). It imports neither torch nor pydantic, so that reading it costs
nothing; the code behind a name is found by it: an encoder family's in `pipeline.encoders`, a model
architecture's in `pipeline.models`.

Words: an *encoder* is a frozen network family (clip, cnn); a *store* is a named feature store, what one
encoder wrote with its settings; a *model* is a trained captioner: an architecture (viclipcap, cnn_lstm)
trained on a store with its own settings, with its own model directory, metrics file and DVC stages.

Adding a variant: one `Model` below, its `train.<name>` section in params.yaml, and any section of its own
(with its type in `config`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.errors import ViclipError

Sections = dict[str, Any]  # params section name -> its settings (a pydantic section), as a model reads them


@dataclass(frozen=True)
class Store:
    """A feature store. Its params section and its folder under extract.out share its name; a store of one
    encoder per dataset would add the dataset to the folder, not a new kind of name."""

    name: str
    encoder: str  # the encoder family that writes it


@dataclass(frozen=True)
class Model:
    name: str
    title: str  # what the report and the service call it
    architecture: str  # what is built: viclipcap (CLIP -> mapper -> LM) or cnn_lstm (the baseline)
    store: str  # the feature store it trains and decodes on
    reads: tuple[str, ...]  # the params sections that define it, besides data and train: its DVC params
    objective: Literal["cross_entropy", "scst"] = "cross_entropy"  # scst: from train.<name>.start_from's weights
    # Its sections where they are not `reads` as they are: the params sections it reads -> those it is built from.
    own_sections: Callable[[Any], Sections] | None = None

    def sections(self, config: Any) -> Sections:
        """What defines the model under `config`: the sections its architecture is built from."""
        if self.objective == "scst":  # SCST changes the weights, not the model: it is the model it starts from
            return model(getattr(config.train, self.name).start_from).sections(config)
        return self.own_sections(config) if self.own_sections else {name: getattr(config, name) for name in self.reads}


def _published(config: Any) -> Sections:
    """The published run's mapper and LM training (its own section) around the same LM."""
    own = config.viclipcap_published
    return {"clip_published": config.clip_published, "mapper": own.mapper,
            "lm": config.lm.model_copy(update={"train": own.lm_train})}


STORES: dict[str, Store] = {store.name: store for store in (
    Store("clip", "clip"),
    Store("cnn", "cnn"),
    # The CLIP that ViCLIPCap's public code ran (ViT-B/16), for the published setting.
    Store("clip_published", "clip"),
)}

# In the report's order: the baseline, ViCLIPCap, then its variants (viclipcap with other settings).
MODELS: dict[str, Model] = {entry.name: entry for entry in (
    Model("cnn_lstm", "CNN+LSTM", "cnn_lstm", "cnn", ("cnn", "lstm")),
    Model("viclipcap", "ViCLIPCap", "viclipcap", "clip", ("clip", "lm", "mapper")),
    # A prompt of retrieved training captions after the prefix.
    Model("viclipcap_rag", "ViCLIPCap + retrieval", "viclipcap", "clip", ("clip", "lm", "mapper", "retrieval")),
    # A trained model's mapper fine-tuned by self-critical sequence training on CIDEr-D. What its starting
    # model reads changes that model's directory, on which it depends.
    Model("viclipcap_scst", "ViCLIPCap + SCST", "viclipcap", "clip", (), objective="scst"),
    # The published ViCLIPCap run: its CLIP, its MLP mapper, the LM trained with it.
    Model("viclipcap_published", "ViCLIPCap, published setting", "viclipcap", "clip_published",
          ("clip_published", "lm", "viclipcap_published"), own_sections=_published),
)}

DEFAULT_MODEL = "viclipcap"  # what a command runs when no --model is given
DEFAULT_STORE = MODELS[DEFAULT_MODEL].store


def model(name: str) -> Model:
    if name not in MODELS:
        raise ViclipError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return MODELS[name]


def starting_points(name: str) -> tuple[str, ...]:
    """The models an SCST model can start from: its architecture trained by cross-entropy on its store."""
    scst = MODELS[name]
    return tuple(m.name for m in MODELS.values()
                 if m.objective == "cross_entropy" and (m.architecture, m.store) == (scst.architecture, scst.store))
