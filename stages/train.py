"""Stage 2: train a model on the stored image features, its backbones frozen; keep the best epoch.

Every model, one loop: AdamW on the trainable parameters, linear warm-up then decay, a validation
figure after every epoch, the best epoch's weights kept, and early stopping after `patience` epochs
without a better one. The objective is cross-entropy (validation loss, lower is better), or for an
SCST model self-critical training from the model it starts from (validation CIDEr-D, higher is
better; the starting model is epoch 0). A variant trains under its own view of the params. Each epoch
ends with a checkpoint (pipeline/training/checkpoint.py), so a killed run resumes where it was. Under torchrun
what is trained is wrapped in DistributedDataParallel; the main rank writes.
"""

from __future__ import annotations

import hashlib
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.core import distributed, names, paths
from pipeline.core.config import Config, ScstSettings, dump_config
from pipeline.core.devices import best_device, hardware
from pipeline.core.errors import ViclipError
from pipeline.core.io import atomic_path, write_json, write_text
from pipeline.data.annotations import load_splits
from pipeline.data.features import FeatureStore, open_store
from pipeline.encoders import encoder_attrs
from pipeline.models import CONFIG, check_record, family, read_spec, spec_for
from pipeline.models.base import load_trained_state, trainable_parameters, trained_state
from pipeline.training import checkpoint
from pipeline.training.batches import CaptionSet
from pipeline.training.checkpoint import seed_everything
from pipeline.training.cross_entropy import CrossEntropy
from pipeline.training.optimisation import Optimisation
from pipeline.training.scst import ImageSet, SelfCritical

PRECISION_NOTES = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, gradient scaler", "fp32": "fp32"}


def _fingerprint(config: Config, model_name: str, stores: dict[str, FeatureStore], start: dict | None) -> str:
    """The settings, data and processes a checkpoint belongs to (the code is added by `checkpoint`)."""
    return checkpoint.fingerprint({
        "model": model_name,
        "sections": {s: getattr(config, s) and getattr(config, s).model_dump() for s in ("data", *family(model_name).sections)},
        "seed": config.train.seed,
        "train": getattr(config.train, model_name).model_dump(),
        "stores": {split: store.identity() for split, store in stores.items()},
        "start_from": start,
        # SCST picks its best epoch by validation captions decoded with the score settings.
        "decoding": config.score.decoding() if start else None,
        "processes": distributed.world_size(),
    })


def _start_from(config: Config, model: torch.nn.Module, name: str, encoder: dict) -> dict:
    """Load the weights of model `name`, trained under the settings this one reads; what it was, for the record."""
    directory = paths.model_dir(config, name)
    spec = read_spec(directory)
    if spec.name != name:
        raise ViclipError(f"{directory}: holds model {spec.name!r}, not {name!r}")
    differ = [s for s in spec.sections if spec.sections[s] != getattr(config, s)]
    if spec.encoder != encoder or differ:
        what = ", ".join(differ) or "its feature store"
        raise ViclipError(f"{directory}: trained under other settings ({what}); run `viclip train --model {name}` first")
    check_record(model, spec, directory)
    model.restore(directory)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.glob("*.safetensors")))).hexdigest()
    return {"model": name, "weights": f"sha256:{digest}", **{k: spec.extra.get(k) for k in ("val_loss", "best_epoch")}}


def run(config: Config, model_name: str = names.MODEL) -> str:
    started = time.perf_counter()
    recipe = family(model_name)
    params, config = config, recipe.view(config)  # as params.yaml says, and as this model reads them
    settings = getattr(config.train, model_name)
    seed_everything(config.train.seed)
    device = best_device()
    records = load_splits(config.data)
    expected = encoder_attrs(recipe.encoder, getattr(config, recipe.encoder))
    stores = {
        split: open_store(paths.store_path(config, split, recipe.encoder), expected) for split in ("train", "val")
    }
    encoder = {**expected, "embedding_dim": stores["train"].attrs["embedding_dim"]}

    model = recipe.build(config, records["train"], stores["train"], encoder, device)
    start = None
    if isinstance(settings, ScstSettings):
        start = _start_from(config, model, settings.start_from, encoder)
        data = {split: ImageSet.build(records[split], stores[split], device) for split in stores}
        objective = SelfCritical(model, data, settings, config.score)
    else:
        data = {
            split: CaptionSet.build(records[split], stores[split], model.encode, model.max_tokens, device)
            for split in stores
        }
        for split, captions in data.items():
            if isinstance(captions.features, FeatureStore) and distributed.is_main():
                print(f"train {model_name}: {split} features over the memory budget, read from disk batch by batch",
                      file=sys.stderr)
        objective = CrossEntropy(data, settings.batch_size)
    optimisation = Optimisation.build(model, settings, settings.epochs * objective.steps, device)
    generator = torch.Generator().manual_seed(config.train.seed)
    if distributed.world_size() > 1:
        # Every rank built the same weights from the same seed; from here each draws its own dropout masks
        # (the baseline's, a trained GPT-2's; the mapper has none) and samples, rank 0 the one-process stream.
        torch.manual_seed(config.train.seed + 7919 * distributed.rank())
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if distributed.world_size() > 1 else model

    resume_path = paths.checkpoint_path(config, model_name)
    fingerprint = _fingerprint(config, model_name, stores, start)
    state, why = checkpoint.load(resume_path, fingerprint)
    if len(set(distributed.gather(state and state["epoch"]))) > 1:
        raise ViclipError(f"{resume_path}: the ranks see different checkpoints; put train.out where every machine sees it")
    log = [f"epoch,{','.join(objective.columns)},lr,seconds"]
    # Where training starts from a trained model, that model is epoch 0: kept unless an epoch beats it.
    epoch, best_epoch, best, best_value, first_value, elapsed = 0, 0, None, None, None, 0.0
    if state is not None:
        load_trained_state(model, state["model"])
        optimisation.load_state_dict(state["optimisation"])
        generator.set_state(state["generator"])
        checkpoint.set_rng_state(state["rng"][distributed.rank()])
        epoch, log, best_value, first_value, best_epoch, elapsed = (
            state[k] for k in ("epoch", "log", "best_value", "first_value", "best_epoch", "elapsed"))
        best = state["best"] or state["model"]
        why = f"train {model_name}: resuming after epoch {epoch} from {resume_path}"
    elif start:
        best_value = first_value = objective.validate(model, optimisation.policy)
    if why and distributed.is_main():
        print(why, file=sys.stderr)
    best = best or (trained_state(model) if start else None)

    while epoch < settings.epochs and epoch - best_epoch < settings.patience:
        epoch += 1
        epoch_start = time.perf_counter()
        train_value = objective.epoch(trained, optimisation, generator, f"{model_name} epoch {epoch}/{settings.epochs}")
        value = objective.validate(model, optimisation.policy)
        log.append(
            f"{epoch},{train_value:.6f},{value:.6f},{optimisation.scheduler.get_last_lr()[0]:.3g},"
            f"{time.perf_counter() - epoch_start:.2f}"
        )
        improved = best_value is None or (value > best_value if objective.higher_is_better else value < best_value)
        if improved:
            best_value, best_epoch = value, epoch
        rng = distributed.gather(checkpoint.rng_state())
        if distributed.is_main():
            write_text(paths.train_log(config, model_name), "\n".join(log) + "\n")
            current = trained_state(model)
            best = current if improved else best
            checkpoint.save(resume_path, fingerprint, {
                "epoch": epoch, "model": current, "best": None if improved else best,
                "optimisation": optimisation.state_dict(), "generator": generator.get_state(), "rng": rng,
                "log": log, "best_value": best_value, "first_value": first_value, "best_epoch": best_epoch,
                "elapsed": elapsed + time.perf_counter() - started,
            })

    validation = objective.columns[1]
    if distributed.is_main():
        load_trained_state(model, best)
        spec = spec_for(model_name, config, encoder, {
            "trainable_parameters": trainable_parameters(model),
            "epochs": epoch,
            "best_epoch": best_epoch,
            validation: round(best_value, 6),
            **({"start_from": start, f"start_{validation}": round(first_value, 6)} if start else {}),
            "train_seconds": round(elapsed + time.perf_counter() - started, 1),
            "device": hardware(device),
            "processes": distributed.world_size(),
            "precision": PRECISION_NOTES[optimisation.policy],
            **model.record(),
        })
        with atomic_path(paths.model_dir(config, model_name)) as model_dir:
            model_dir.mkdir()
            model.save(model_dir)
            write_json(model_dir / CONFIG, spec.to_json())
            write_text(model_dir / "params.yaml", dump_config(params))
        resume_path.unlink(missing_ok=True)

    stopped = f", stopped early at epoch {epoch}" if epoch < settings.epochs else ""
    began = f" (from {start['model']}: {first_value:.4f})" if start else ""
    return (
        f"train {model_name}: {len(data['train'])} {'images' if start else 'captions'}, "
        f"{trainable_parameters(model):,} trainable parameters, best {validation.replace('_', ' ')} {best_value:.4f}{began} "
        f"(epoch {best_epoch}{stopped}) -> {paths.model_dir(config, model_name)} ({time.perf_counter() - started:.1f} s)"
    )
