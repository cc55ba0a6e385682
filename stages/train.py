"""Stage 2: train a model on the stored image features, its backbones frozen; keep the best epoch.

Read the params as the model reads them (a variant's view), build the model on its feature stores, fit it
(pipeline.training.trainer: the loop, early stopping, resuming after a crash, the objective its family
trains by), and write its model directory.
"""

from __future__ import annotations

import time

from pipeline.core import distributed, names, paths
from pipeline.core.config import Config, dump_config
from pipeline.core.devices import best_device, hardware
from pipeline.core.io import atomic_path, write_json, write_text
from pipeline.data.annotations import load_splits
from pipeline.data.features import open_store
from pipeline.encoders import encoder_attrs
from pipeline.models import CONFIG, family, spec_for
from pipeline.models.base import trainable_parameters
from pipeline.training import trainer
from pipeline.training.checkpoint import seed_everything

PRECISION_NOTES = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, gradient scaler", "fp32": "fp32"}


def run(config: Config, model_name: str = names.MODEL) -> str:
    started = time.perf_counter()
    recipe = family(model_name)
    params, config = config, recipe.view(config)  # as params.yaml says, and as this model reads them
    seed_everything(config.train.seed)
    device = best_device()
    records = load_splits(config.data)
    expected = encoder_attrs(recipe.encoder, getattr(config, recipe.encoder))
    stores = {split: open_store(paths.store_path(config, split, recipe.encoder), expected) for split in ("train", "val")}
    encoder = {**expected, "embedding_dim": stores["train"].attrs["embedding_dim"]}

    model = recipe.build(config, records["train"], stores["train"], encoder, device)
    objective, start = trainer.objective_for(model_name, config, model, records, stores, encoder, device)
    run = trainer.Trainer(model_name, model, objective, config, device,
                          trainer.fingerprint(config, model_name, stores, start), start, started)
    state = run.fit()

    validation = objective.columns[1]
    if distributed.is_main():
        spec = spec_for(model_name, config, encoder, {
            "trainable_parameters": trainable_parameters(model),
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            validation: round(state.best_value, 6),
            **({"start_from": start, f"start_{validation}": round(state.first_value, 6)} if start else {}),
            "train_seconds": round(state.elapsed, 1),
            "device": hardware(device),
            "processes": distributed.world_size(),
            "precision": PRECISION_NOTES[run.optimisation.policy],
            **model.record(),
        })
        with atomic_path(paths.model_dir(config, model_name)) as model_dir:
            model_dir.mkdir()
            model.save(model_dir)
            write_json(model_dir / CONFIG, spec.to_json())
            write_text(model_dir / "params.yaml", dump_config(params))
        run.finish()

    stopped = f", stopped early at epoch {state.epoch}" if state.epoch < run.settings.epochs else ""
    began = f" (from {start['model']}: {state.first_value:.4f})" if start else ""
    return (
        f"train {model_name}: {len(objective.data['train'])} {'images' if start else 'captions'}, "
        f"{trainable_parameters(model):,} trainable parameters, best {validation.replace('_', ' ')} "
        f"{state.best_value:.4f}{began} (epoch {state.best_epoch}{stopped}) -> {paths.model_dir(config, model_name)} "
        f"({time.perf_counter() - started:.1f} s)"
    )
