"""Where each stage writes, derived from the `out` folders declared in params.yaml."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config

MODEL = "viclipcap"
ENCODER = "clip"


def store_dir(config: Config, encoder: str = ENCODER) -> Path:
    return Path(config.extract.out) / encoder


def store_path(config: Config, split: str, encoder: str = ENCODER) -> Path:
    return store_dir(config, encoder) / f"{split}.h5"


def model_dir(config: Config, model: str = MODEL) -> Path:
    return Path(config.train.out) / model


def train_log(config: Config, model: str = MODEL) -> Path:
    return Path(config.train.out) / f"{model}.csv"


def metrics_path(config: Config, model: str = MODEL) -> Path:
    return Path(config.score.out) / f"{model}.json"


def captions_path(config: Config, model: str = MODEL) -> Path:
    return Path(config.score.out) / f"{model}.captions.json"
