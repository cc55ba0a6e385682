"""Stage 2: train a model on the stored image features, its backbones frozen; keep the best epoch.

Either model, one loop: AdamW on the trainable parameters, linear warm-up then
decay, validation loss after every epoch, the best epoch's weights kept, and
early stopping after `patience` epochs without improvement.
"""

from __future__ import annotations

import time

import torch

from pipeline import paths
from pipeline.config import Config, dump_config
from pipeline.data import load_splits
from pipeline.devices import best_device, hardware
from pipeline.encoders import encoder_attrs
from pipeline.features import open_store
from pipeline.io import atomic_path, write_json, write_text
from pipeline.models import CONFIG, family, spec_for
from pipeline.models.base import trainable_parameters
from pipeline.training import CaptionSet, Optimisation, evaluate, seed_everything, train_epoch

PRECISION_NOTES = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, gradient scaler", "fp32": "fp32"}


def run(config: Config, model_name: str = paths.MODEL) -> str:
    started = time.perf_counter()
    recipe = family(model_name)
    settings = getattr(config.train, model_name)
    seed_everything(config.train.seed)
    device = best_device()
    records = load_splits(config.data)
    expected = encoder_attrs(recipe.encoder, getattr(config, recipe.encoder))
    stores = {
        split: open_store(paths.store_path(config, split, recipe.encoder), expected) for split in ("train", "val")
    }
    encoder = {**expected, "embedding_dim": stores["train"].attrs["embedding_dim"]}

    model = recipe.build(config, records["train"], encoder, device)
    data = {
        split: CaptionSet.build(records[split], stores[split], model.encode, model.max_tokens, device)
        for split in stores
    }
    steps = settings.epochs * -(-len(data["train"]) // settings.batch_size)
    optimisation = Optimisation.build(model, settings, steps, device)
    generator = torch.Generator().manual_seed(config.train.seed)

    log = ["epoch,train_loss,val_loss,lr,seconds"]
    best_loss, best_epoch = float("inf"), 0
    with atomic_path(paths.model_dir(config, model_name)) as model_dir:
        model_dir.mkdir()
        for epoch in range(1, settings.epochs + 1):
            epoch_start = time.perf_counter()
            train_loss = train_epoch(
                model, data["train"], settings.batch_size, optimisation, generator,
                f"{model_name} epoch {epoch}/{settings.epochs}",
            )
            val_loss = evaluate(model, data["val"], settings.batch_size, optimisation.policy)
            log.append(
                f"{epoch},{train_loss:.6f},{val_loss:.6f},{optimisation.scheduler.get_last_lr()[0]:.3g},"
                f"{time.perf_counter() - epoch_start:.2f}"
            )
            write_text(paths.train_log(config, model_name), "\n".join(log) + "\n")
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                model.save(model_dir)
            elif epoch - best_epoch >= settings.patience:
                break
        spec = spec_for(model_name, config, encoder, {
            "trainable_parameters": trainable_parameters(model),
            "epochs": epoch,
            "best_epoch": best_epoch,
            "val_loss": round(best_loss, 6),
            "train_seconds": round(time.perf_counter() - started, 1),
            "device": hardware(device),
            "precision": PRECISION_NOTES[optimisation.policy],
            **model.record(),
        })
        write_json(model_dir / CONFIG, spec.to_json())
        write_text(model_dir / "params.yaml", dump_config(config))

    stopped = f", stopped early at epoch {epoch}" if epoch < settings.epochs else ""
    return (
        f"train {model_name}: {len(data['train'])} captions, {trainable_parameters(model):,} trainable parameters, "
        f"best val loss {best_loss:.4f} (epoch {best_epoch}{stopped}) -> {paths.model_dir(config, model_name)} "
        f"({time.perf_counter() - started:.1f} s)"
    )
