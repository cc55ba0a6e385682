"""The training loop every model runs, its objective the one its registry entry names.

AdamW on the trainable parameters, linear warm-up then decay, a validation figure after every epoch, the
best epoch's weights kept, and early stopping after `patience` epochs without a better one. The objective
is cross-entropy (validation loss, lower is better), or for an SCST model self-critical training from the
model it starts from (validation CIDEr-D, higher is better; the starting model is epoch 0). Each epoch ends
with a checkpoint (`checkpoint`), so a killed run resumes where it was; where the loop stands is one
`TrainerState`. Under torchrun what is trained is wrapped in DistributedDataParallel; the main rank writes.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.core import distributed, paths, registry
from pipeline.core.config import Config, TrainSettings
from pipeline.core.devices import Precision, compiling
from pipeline.core.errors import ViclipError
from pipeline.core.io import write_text
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore
from pipeline.models import check_record, read_spec
from pipeline.models.base import CaptionModel, load_trained_state, trained_state
from pipeline.training import checkpoint
from pipeline.training.batches import CaptionSet
from pipeline.training.cross_entropy import CrossEntropy
from pipeline.training.optimisation import Optimisation
from pipeline.training.scst import ImageSet, SelfCritical


class Objective(Protocol):
    columns: tuple[str, str]  # what the log calls an epoch's training and validation figures
    higher_is_better: bool
    steps: int  # optimiser steps an epoch
    data: dict  # the train and val splits, as the objective reads them

    def epoch(self, trained: torch.nn.Module, optimisation: Optimisation, generator: torch.Generator,
              description: str) -> float: ...

    def validate(self, model: CaptionModel, policy: Precision) -> float: ...


@dataclass
class TrainerState:
    """Where a run stands after `epoch` epochs; the resume checkpoint holds it beside the weights."""

    epoch: int = 0
    best_epoch: int = 0  # 0: the model training started from, where it starts from one
    best_value: float | None = None  # the best epoch's validation figure
    first_value: float | None = None  # the starting model's, where training starts from one
    elapsed: float = 0.0  # seconds spent by the processes before this one
    log: list[str] = field(default_factory=list)  # the per-epoch CSV, header first


def start_from(config: Config, model: CaptionModel, name: str, attrs: dict) -> dict:
    """Load the weights of model `name`, trained under the settings this one reads; what it was, for the record."""
    directory = paths.model_dir(config, name)
    spec = read_spec(directory)
    if spec.name != name:
        raise ViclipError(f"{directory}: holds model {spec.name!r}, not {name!r}")
    now = registry.model(name).sections(config)
    differ = [s for s in sorted({*spec.sections, *now}) if spec.sections.get(s) != now.get(s)]
    if spec.store_attrs != attrs or differ:
        what = ", ".join(differ) or "its feature store"
        raise ViclipError(f"{directory}: trained under other settings ({what}); run `viclip train --model {name}` first")
    check_record(model, spec, directory)
    model.restore(directory)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.glob("*.safetensors")))).hexdigest()
    return {"model": name, "weights": f"sha256:{digest}", **{k: spec.training.get(k) for k in ("val_loss", "best_epoch")}}


def objective_for(name: str, config: Config, model: CaptionModel, records: dict[str, list[ImageRecord]],
                  stores: dict[str, FeatureStore], attrs: dict, device: torch.device) -> tuple[Objective, dict | None]:
    """Model `name`'s objective over the train and val splits, and the model it starts from (None: from scratch)."""
    settings = getattr(config.train, name)
    if registry.model(name).objective == "scst":
        start = start_from(config, model, settings.start_from, attrs)
        data = {split: ImageSet.build(records[split], stores[split], device) for split in stores}
        return SelfCritical(model, data, settings, config.score), start
    captions = {split: CaptionSet.build(records[split], stores[split], model.encode, model.max_tokens, device)
                for split in stores}
    for split, data in captions.items():
        if isinstance(data.features, FeatureStore) and distributed.is_main():
            print(f"train {name}: {split} features over the memory budget, read from disk batch by batch",
                  file=sys.stderr)
    return CrossEntropy(captions, settings.batch_size), None


def fingerprint(config: Config, name: str, stores: dict[str, FeatureStore], start: dict | None) -> str:
    """The settings, data and processes a checkpoint belongs to (the code is added by `checkpoint`)."""
    sections = {"data": config.data, **registry.model(name).sections(config)}
    return checkpoint.fingerprint({
        "model": name,
        "sections": {key: section.model_dump() for key, section in sections.items()},
        "seed": config.train.seed,
        "train": getattr(config.train, name).model_dump(),
        "stores": {split: store.identity() for split, store in stores.items()},
        "start_from": start,
        # SCST picks its best epoch by validation captions decoded with the score settings.
        "decoding": config.score.decoding() if start else None,
        "processes": distributed.world_size(),
    })


@dataclass
class Trainer:
    """One model's run: `fit` trains it and leaves the best epoch's weights in it (on the main rank)."""

    name: str
    model: CaptionModel
    objective: Objective
    config: Config
    device: torch.device
    fingerprint: str
    start: dict | None  # the trained model it starts from
    started: float  # time.perf_counter() when the run began: the time it records counts from there
    optimisation: Optimisation = field(init=False)

    @property
    def settings(self) -> TrainSettings:
        return getattr(self.config.train, self.name)

    def fit(self) -> TrainerState:
        started = self.started
        model, objective, settings, seed = self.model, self.objective, self.settings, self.config.train.seed
        self.optimisation = optimisation = Optimisation.build(model, settings, settings.epochs * objective.steps,
                                                              self.device)
        generator = torch.Generator().manual_seed(seed)
        if distributed.world_size() > 1:
            # Every rank built the same weights from the same seed; from here each draws its own dropout masks
            # (the baseline's, a trained GPT-2's; the mapper has none) and samples, rank 0 the one-process stream.
            torch.manual_seed(seed + 7919 * distributed.rank())
        trained = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None) \
            if distributed.world_size() > 1 else model
        if compiling(self.device):
            if isinstance(objective, CrossEntropy) and model.compiles and distributed.world_size() == 1:
                objective.compile(model, self.device)
            elif distributed.is_main():
                print(f"train {self.name}: the step runs eagerly; only ViCLIPCap's cross-entropy training on one "
                      "process, without retrieval or LoRA, compiles", file=sys.stderr)

        resume_path = paths.checkpoint_path(self.config, self.name)
        saved, why = checkpoint.load(resume_path, self.fingerprint)
        if len(set(distributed.gather(saved and saved["epoch"]))) > 1:
            raise ViclipError(f"{resume_path}: the ranks see different checkpoints; put train.out where every machine sees it")
        state = TrainerState(log=[f"epoch,{','.join(objective.columns)},lr,seconds"])
        best = None
        if saved is not None:
            load_trained_state(model, saved["model"])
            optimisation.load_state_dict(saved["optimisation"])
            generator.set_state(saved["generator"])
            checkpoint.set_rng_state(saved["rng"][distributed.rank()])
            state = TrainerState(**{f.name: saved[f.name] for f in fields(TrainerState)})
            best = saved["best"] or saved["model"]
            why = f"train {self.name}: resuming after epoch {state.epoch} from {resume_path}"
        elif self.start:
            state.best_value = state.first_value = objective.validate(model, optimisation.policy)
        if why and distributed.is_main():
            print(why, file=sys.stderr)
        # Where training starts from a trained model, that model is epoch 0: kept unless an epoch beats it.
        best = best or (trained_state(model) if self.start else None)

        while state.epoch < settings.epochs and state.epoch - state.best_epoch < settings.patience:
            state.epoch += 1
            epoch_start = time.perf_counter()
            train_value = objective.epoch(trained, optimisation, generator,
                                          f"{self.name} epoch {state.epoch}/{settings.epochs}")
            value = objective.validate(model, optimisation.policy)
            state.log.append(
                f"{state.epoch},{train_value:.6f},{value:.6f},{optimisation.scheduler.get_last_lr()[0]:.3g},"
                f"{time.perf_counter() - epoch_start:.2f}"
            )
            improved = state.best_value is None or (
                value > state.best_value if objective.higher_is_better else value < state.best_value)
            if improved:
                state.best_value, state.best_epoch = value, state.epoch
            rng = distributed.gather(checkpoint.rng_state())
            if distributed.is_main():
                write_text(paths.train_log(self.config, self.name), "\n".join(state.log) + "\n")
                current = trained_state(model)
                best = current if improved else best
                saving = {**asdict(state), "elapsed": state.elapsed + time.perf_counter() - started}
                checkpoint.save(resume_path, self.fingerprint, {
                    "model": current, "best": None if improved else best, "optimisation": optimisation.state_dict(),
                    "generator": generator.get_state(), "rng": rng, **saving,
                })
        state.elapsed += time.perf_counter() - started
        if distributed.is_main():
            load_trained_state(model, best)
        return state

    def finish(self) -> None:
        """The model directory is written: the checkpoint is done with."""
        paths.checkpoint_path(self.config, self.name).unlink(missing_ok=True)

