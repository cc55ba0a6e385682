"""Stage 2: train the mapping network on stored embeddings, the LM frozen; keep the best epoch."""

from __future__ import annotations

import time

import torch
from transformers import get_linear_schedule_with_warmup

from pipeline import paths
from pipeline.captioner import CONFIG, WEIGHTS, Captioner, ModelSpec, save_mapper, trainable_parameters
from pipeline.config import Config, dump_config
from pipeline.data import load_splits
from pipeline.encoders import best_device, clip_attrs
from pipeline.features import open_store
from pipeline.io import atomic_path, write_json, write_text
from pipeline.lm import load_lm
from pipeline.mapper import build_mapper
from pipeline.training import CaptionSet, evaluate, seed_everything, train_epoch


def run(config: Config) -> str:
    started = time.perf_counter()
    settings = config.train
    seed_everything(settings.seed)
    device = best_device()
    records = load_splits(config.data)
    expected = clip_attrs(config.clip)
    stores = {split: open_store(paths.store_path(config, split), expected) for split in ("train", "val")}
    embedding_dim = stores["train"].attrs["embedding_dim"]

    lm = load_lm(config.lm.name, device)
    room = lm.model.config.max_position_embeddings - config.mapper.prefix_length
    data = {split: CaptionSet.build(records[split], stores[split], lm, room, device) for split in stores}
    mapper = build_mapper(config.mapper, embedding_dim, lm.width).to(device)
    captioner = Captioner(mapper, lm)

    optimizer = torch.optim.AdamW(mapper.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(data["train"]) // settings.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, steps)
    generator = torch.Generator().manual_seed(settings.seed)

    log = ["epoch,train_loss,val_loss,lr,seconds"]
    best_loss, best_epoch = float("inf"), 0
    with atomic_path(paths.model_dir(config)) as model_dir:
        model_dir.mkdir()
        for epoch in range(1, settings.epochs + 1):
            epoch_start = time.perf_counter()
            train_loss = train_epoch(
                captioner, data["train"], settings.batch_size, optimizer, scheduler, generator,
                f"epoch {epoch}/{settings.epochs}",
            )
            val_loss = evaluate(captioner, data["val"], settings.batch_size)
            log.append(
                f"{epoch},{train_loss:.6f},{val_loss:.6f},{scheduler.get_last_lr()[0]:.3g},"
                f"{time.perf_counter() - epoch_start:.2f}"
            )
            write_text(paths.train_log(config), "\n".join(log) + "\n")
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                save_mapper(mapper, model_dir / WEIGHTS)
        encoder = {**expected, "embedding_dim": embedding_dim}
        spec = ModelSpec(
            paths.MODEL, config.lm.name, config.clip, encoder, config.mapper,
            {
                "trainable_parameters": trainable_parameters(mapper),
                "best_epoch": best_epoch,
                "val_loss": round(best_loss, 6),
                "train_seconds": round(time.perf_counter() - started, 1),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            },
        )
        write_json(model_dir / CONFIG, spec.to_json())
        write_text(model_dir / "params.yaml", dump_config(config))

    return (
        f"train: {len(data['train'])} captions x {settings.epochs} epochs, "
        f"{trainable_parameters(mapper):,} trainable parameters, best val loss {best_loss:.4f} "
        f"(epoch {best_epoch}) -> {paths.model_dir(config)} ({time.perf_counter() - started:.1f} s)"
    )
