"""Where each stage writes: derived from the `out` folders in params.yaml."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.registry import DEFAULT_MODEL, DEFAULT_STORE, MODELS


def store_dir(config: Config, store: str = DEFAULT_STORE) -> Path:
    return Path(config.extract.out) / store


def store_path(config: Config, split: str, store: str = DEFAULT_STORE) -> Path:
    return store_dir(config, store) / f"{split}.h5"


def chunk_dir(config: Config, split: str, store: str = DEFAULT_STORE) -> Path:
    """Where `viclip extract` keeps a split's finished chunks until its store is assembled. Not inside
    store_dir, which DVC deletes before it runs the stage: a re-run after a kill resumes from them."""
    return Path(config.extract.out) / ".chunks" / store / split


def model_dir(config: Config, model: str = DEFAULT_MODEL) -> Path:
    return Path(config.train.out) / model


def train_log(config: Config, model: str = DEFAULT_MODEL) -> Path:
    return Path(config.train.out) / f"{model}.csv"


def checkpoint_path(config: Config, model: str = DEFAULT_MODEL) -> Path:
    """Where training keeps its resume state: beside the model directory, which DVC deletes before a run."""
    return Path(config.train.out) / f".{model}.resume.pt"


def metrics_path(config: Config, model: str = DEFAULT_MODEL) -> Path:
    return Path(config.score.out) / f"{model}.json"


def scored_models(config: Config) -> list[str]:
    """The registered models that `viclip score` has written a metrics file for."""
    return [model for model in MODELS if metrics_path(config, model).is_file()]


def captions_path(config: Config, model: str = DEFAULT_MODEL) -> Path:
    return Path(config.score.out) / f"{model}.captions.json"


def report_path(config: Config) -> Path:
    return Path(config.compare.out) / "comparison.md"


def chart_path(config: Config) -> Path:
    return Path(config.compare.out) / "comparison.png"
