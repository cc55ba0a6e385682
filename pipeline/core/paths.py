"""Where each stage writes: derived from the `out` folders in params.yaml."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.names import ENCODER, MODEL, MODELS


def store_dir(config: Config, encoder: str = ENCODER) -> Path:
    return Path(config.extract.out) / encoder


def store_path(config: Config, split: str, encoder: str = ENCODER) -> Path:
    return store_dir(config, encoder) / f"{split}.h5"


def chunk_dir(config: Config, split: str, encoder: str = ENCODER) -> Path:
    """Where `viclip extract` keeps a split's finished chunks until its store is assembled. Not inside
    store_dir, which DVC deletes before it runs the stage: a re-run after a kill resumes from them."""
    return Path(config.extract.out) / ".chunks" / encoder / split


def model_dir(config: Config, model: str = MODEL) -> Path:
    return Path(config.train.out) / model


def train_log(config: Config, model: str = MODEL) -> Path:
    return Path(config.train.out) / f"{model}.csv"


def checkpoint_path(config: Config, model: str = MODEL) -> Path:
    """Where training keeps its resume state: beside the model directory, which DVC deletes before a run."""
    return Path(config.train.out) / f".{model}.resume.pt"


def metrics_path(config: Config, model: str = MODEL) -> Path:
    return Path(config.score.out) / f"{model}.json"


def scored_models(config: Config) -> list[str]:
    """The models in MODELS that `viclip score` has written a metrics file for."""
    return [model for model in MODELS if metrics_path(config, model).is_file()]


def captions_path(config: Config, model: str = MODEL) -> Path:
    return Path(config.score.out) / f"{model}.captions.json"


def report_path(config: Config) -> Path:
    return Path(config.compare.out) / "comparison.md"


def chart_path(config: Config) -> Path:
    return Path(config.compare.out) / "comparison.png"
