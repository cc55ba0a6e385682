"""Stage 2: train a model on the stored image features, its backbones frozen; keep the best epoch.

Build the model from the params sections that define it (its registry entry) on its feature store, fit it
(pipeline.training.trainer: the loop, early stopping, resuming after a crash, the objective its entry
names), and write its model directory.
"""

from __future__ import annotations

import time

from pipeline.core import distributed, paths, registry
from pipeline.core.config import Config, dump_config
from pipeline.core.devices import best_device, hardware
from pipeline.core.io import atomic_path, write_json, write_text
from pipeline.data.datasets import load_dataset
from pipeline.data.features import open_store
from pipeline.encoders import encoder_attrs
from pipeline.models import CONFIG, build_model, spec_for
from pipeline.models.base import trainable_parameters
from pipeline.training import trainer
from pipeline.training.checkpoint import seed_everything

PRECISION_NOTES = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, gradient scaler", "fp32": "fp32"}


def run(config: Config, model_name: str = registry.DEFAULT_MODEL) -> str:
    started = time.perf_counter()
    store = registry.STORES[registry.model(model_name).store]
    seed_everything(config.train.seed)
    device = best_device()
    dataset = load_dataset(config.data)
    records = dataset.splits
    # The model records its encoder's attributes, not the dataset's: it may caption (and score) any images.
    expected = encoder_attrs(store.encoder, getattr(config, store.name))
    stores = {split: open_store(paths.store_path(config, split, store.name), {**expected, **dataset.attrs()})
              for split in ("train", "val")}
    attrs = {**expected, "embedding_dim": stores["train"].attrs["embedding_dim"]}

    model = build_model(model_name, config, records["train"], stores["train"], attrs, device)
    objective, start = trainer.objective_for(model_name, config, model, records, stores, attrs, device)
    run = trainer.Trainer(model_name, model, objective, config, device,
                          trainer.fingerprint(config, model_name, stores, start), start, started)
    state = run.fit()

    validation = objective.columns[1]
    if distributed.is_main():
        spec = spec_for(model_name, config, model, attrs, {
            "dataset": dataset.name,
            "trainable_parameters": trainable_parameters(model),
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            validation: round(state.best_value, 6),
            **({"start_from": start, f"start_{validation}": round(state.first_value, 6)} if start else {}),
            "train_seconds": round(state.elapsed, 1),
            "device": hardware(device),
            "processes": distributed.world_size(),
            "precision": PRECISION_NOTES[run.optimisation.policy],
        })
        with atomic_path(paths.model_dir(config, model_name)) as model_dir:
            model_dir.mkdir()
            model.save(model_dir)
            write_json(model_dir / CONFIG, spec.to_json())
            write_text(model_dir / "params.yaml", dump_config(config))
        run.finish()

    stopped = f", stopped early at epoch {state.epoch}" if state.epoch < run.settings.epochs else ""
    began = f" (from {start['model']}: {state.first_value:.4f})" if start else ""
    return (
        f"train {model_name}: {dataset.name}, {len(objective.data['train'])} {'images' if start else 'captions'}, "
        f"{trainable_parameters(model):,} trainable parameters, best {validation.replace('_', ' ')} "
        f"{state.best_value:.4f}{began} (epoch {state.best_epoch}{stopped}) -> {paths.model_dir(config, model_name)} "
        f"({time.perf_counter() - started:.1f} s)"
    )
