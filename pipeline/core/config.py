"""Typed, strict configuration read from params.yaml.

params.yaml is the single source of every setting: the models below have no
defaults, so a missing key fails as loudly as an unknown or mistyped one.
Sections share their names with the DVC stages and CLI commands that read them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from ruamel.yaml import YAML, YAMLError

from pipeline.core import registry
from pipeline.core.errors import ViclipError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


DataFormat = Literal["ktvic", "uitviic", "viecap4h", "coco", "table"]  # pipeline.data.datasets.FORMATS


class DataConfig(_Section):
    root: str  # a dataset's folder (or a table file): KTVIC, UIT-ViIC, vieCap4H, COCO captions or a table
    val_fraction: float = Field(gt=0, lt=1)  # of train images carved out for validation
    seed: int  # fixes which images are carved out
    # Optional, as they came after params files that lack them. The dataset's format where detection is
    # ambiguous (null: detected); the share of images carved out of train for a test split, for a dataset
    # without one (vieCap4H, a table without a split column).
    format: DataFormat | None = None
    test_fraction: float = Field(default=0.1, gt=0, lt=1)


class ClipConfig(_Section):
    model: str  # an open_clip architecture name
    pretrained: str  # an open_clip tag (e.g. "openai") or a local checkpoint file
    config: str | None  # a JSON architecture to register, for models open_clip does not ship
    normalize: bool  # L2-normalise the image embeddings


class CnnConfig(_Section):
    model: str  # a torchvision classification CNN (ResNet family, or one with a `.features` trunk)
    weights: str | None  # a torchvision weights name (e.g. "IMAGENET1K_V2"), a local checkpoint file, or null: random
    image_size: int = Field(gt=0)  # images are resized to image_size x image_size (nothing cropped)
    grid: int = Field(gt=0)  # the feature map is pooled to grid x grid positions


LmTrain = Literal["frozen", "lora", "full"]  # lm.train


class LoraSettings(_Section):
    """Low-rank adapters (LoRA, Hu et al. 2021) on the LM's attention, for lm.train: lora, where the LoRA
    paper found adapting the attention enough."""

    rank: int = Field(gt=0)  # r: the rank of each adapter's update B @ A
    alpha: int = Field(gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(ge=0, lt=1)  # on the adapters' input, while training
    # The layers adapted, by name (peft's `target_modules`); null: the LM family's attention projections
    # (GPT-2's c_attn, Llama's and Qwen2's q_proj and v_proj, BLOOM's query_key_value, MPT's Wqkv).
    # Optional, as it came after model directories that lack it.
    targets: list[str] | None = Field(default=None, min_length=1)


class LmConfig(_Section):
    name: str  # a Hugging Face id or a local directory
    # What ends a caption: a text the LM predicts at a sentence end (one token after a caption),
    # or null for the LM's end-of-text token.
    stop: str | None = Field(min_length=1)
    # What training does to the LM: nothing (frozen), adapters on its attention (lora), or every weight
    # (full). A lora or full model directory holds what was trained and loads only onto the same base LM.
    train: LmTrain
    lora: LoraSettings  # read for train: lora only, but always required, like every key
    # The LM's context length, for an LM whose config states none (ALiBi positions: BLOOM), or to use less
    # of it; null: what its config says. Optional, as it came after params files that lack it.
    max_positions: int | None = Field(default=None, gt=0)


class MapperConfig(_Section):
    type: Literal["transformer", "mlp"]
    prefix_length: int = Field(gt=0)  # prefix embeddings handed to the LM
    clip_length: int = Field(gt=0)  # tokens the CLIP embedding is projected to (transformer)
    num_layers: int = Field(gt=0)  # transformer layers
    num_heads: int = Field(gt=0)  # attention heads per layer


class LstmConfig(_Section):
    """The baseline's decoder: Show, Attend and Tell over the CNN grid."""

    min_count: int = Field(gt=0)  # syllables seen fewer times in the training captions become <unk>
    embed_dim: int = Field(gt=0)  # syllable embeddings
    attention_dim: int = Field(gt=0)
    hidden_dim: int = Field(gt=0)  # LSTM state
    dropout: float = Field(ge=0, lt=1)
    attention_reg: float = Field(ge=0)  # weight of the doubly stochastic attention penalty


class ExtractConfig(_Section):
    batch_size: int = Field(gt=0)
    num_workers: int = Field(ge=0)  # image-decoding worker processes
    # Batches per chunk: a split is encoded chunk by chunk, each kept as its own file until the store is
    # written, so a killed run resumes from its finished chunks, and torchrun's processes share whole chunks.
    chunk_batches: int = Field(gt=0)
    skip_bad_images: bool  # skip unreadable images (recorded in the store) instead of stopping
    out: str  # feature stores go to OUT/<store>/<split>.h5, unfinished chunks to OUT/.chunks/


class TrainSettings(_Section):
    """One model's optimisation: AdamW, linear warm-up then decay, early stopping on validation loss."""

    epochs: int = Field(gt=0)  # at most
    patience: int = Field(gt=0)  # stop after this many epochs without a better validation loss
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    grad_clip: float | None = Field(gt=0)  # max gradient norm, or null: no clipping


class ScstSettings(TrainSettings):
    """Self-critical sequence training: a trained model's mapper fine-tuned on CIDEr-D rewards; batch_size counts
    images, epochs and patience count passes over the training images and validation CIDEr."""

    start_from: str  # the cross-entropy model whose mapper it fine-tunes: one of registry.starting_points
    samples: int = Field(gt=1)  # captions sampled per image; each one's baseline is the mean reward of the others
    max_length: int = Field(gt=0)  # tokens a sampled caption may run to, the stop included


class RetrievalConfig(_Section):
    """viclipcap_rag's prompt: captions of the training images nearest to the image, after the prefix."""

    k: int = Field(gt=0)  # captions in the prompt, one from each of the k nearest training images
    template: str = Field(pattern=r"\{captions\}")  # the prompt; {captions} becomes the k captions
    separator: str  # between two retrieved captions


class PublishedConfig(_Section):
    """viclipcap_published: what the published ViCLIPCap run trained (its CLIP is the clip_published section)."""

    mapper: MapperConfig
    lm_train: LmTrain


def _train_settings(model: registry.Model) -> type[TrainSettings]:
    if model.objective == "cross_entropy":
        return TrainSettings
    return create_model(f"{model.name}_settings", __base__=ScstSettings,
                        start_from=(Literal[registry.starting_points(model.name)], ...))


# A section a model trains by, for each registered model.
TrainConfig = create_model(
    "TrainConfig", __base__=_Section,
    seed=(int, ...),
    out=(str, ...),  # models go to OUT/<model>/, their per-epoch log to OUT/<model>.csv
    **{name: (_train_settings(model), ...) for name, model in registry.MODELS.items()},
)


# The score settings that decide which captions a model decodes (SCST's validation decodes with them);
# the others say how captions are counted and where the results go.
DECODING = ("beam_size", "max_length", "length_penalty", "batch_size")


class ScoreConfig(_Section):
    beam_size: int = Field(gt=0)
    max_length: int = Field(gt=0)  # caption tokens, the stop included
    length_penalty: float = Field(ge=0)  # beams ranked by log-prob / length ** length_penalty
    batch_size: int = Field(gt=0)  # images decoded at once
    # How captions are counted: whitespace syllables (ViCLIPCap's table), underthesea's words
    # (the KTVIC paper's), or both (pipeline.evaluation.protocols).
    protocol: Literal["syllable", "word", "both"]
    out: str  # metrics go to OUT/<model>.json, captions to OUT/<model>.captions.json

    def decoding(self) -> dict[str, Any]:
        return self.model_dump(include=set(DECODING))


class CompareConfig(_Section):
    out: str  # the comparison report goes to OUT/comparison.md, its chart to OUT/comparison.png


ENCODER_SETTINGS = {"clip": ClipConfig, "cnn": CnnConfig}  # a store's section, by its encoder family

# Every section of params.yaml; the feature stores' and the models' training sections come from the registry.
Config = create_model(
    "Config", __base__=_Section,
    data=(DataConfig, ...),
    **{name: (ENCODER_SETTINGS[store.encoder], ...) for name, store in registry.STORES.items()},
    lm=(LmConfig, ...),
    mapper=(MapperConfig, ...),
    retrieval=(RetrievalConfig, ...),
    viclipcap_published=(PublishedConfig, ...),
    lstm=(LstmConfig, ...),
    extract=(ExtractConfig, ...),
    train=(TrainConfig, ...),
    score=(ScoreConfig, ...),
    compare=(CompareConfig, ...),
)


def yaml_parser() -> YAML:
    # YAML 1.2, as DVC reads params.yaml: "2e-5" is a float here, not a string.
    return YAML(typ="safe", pure=True)


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    try:
        raw = yaml_parser().load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ViclipError(f"{path}: no such params file (pass --params PATH)") from None
    except YAMLError as error:
        raise ViclipError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "params") -> Config:
    if not isinstance(raw, dict):
        raise ViclipError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ViclipError(_one_line(error, source)) from None


def parse_section(name: str, raw: Any, source: str) -> BaseModel:
    """One params section as a model directory records it (under `sections`), as strict as params.yaml."""
    if name not in Config.model_fields:
        raise ViclipError(f"{source}: unknown section 'sections.{name}'")
    try:
        return Config.model_fields[name].annotation.model_validate(raw)
    except ValidationError as error:
        raise ViclipError(_one_line(error, source, ("sections", name))) from None


def _one_line(error: ValidationError, source: str, within: tuple[str, ...] = ()) -> str:
    """The first problem, naming its key."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in (*within, *first["loc"]))
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'"
    return f"{source}: key '{key}': {first['msg']} (got {first.get('input')!r})"


def dump_config(config: Config | dict) -> str:
    """The resolved config as YAML, to store beside every output it produced."""
    data = config.model_dump() if isinstance(config, Config) else config
    stream = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(data, stream)
    return stream.getvalue()
