"""Each benchmark case: one stage, done by viclip or by the reference (reference.py), at full model size;
the variant case's IMPL is instead the ViCLIPCap variant (a model, and what of the LM trains) it times.

A case runs in a process of its own (`python -m benchmarks.case STAGE IMPL`), so
its peak memory is its own: the allocator has cached nothing from another
case. `setup` builds the models and data and warms up; only `work` is timed.
Sizes depend on the device: a CPU gets a few batches, a GPU a KTVIC-sized run.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks import reference, workload
from benchmarks.measure import profiled
from benchmarks.cider import corpus
from pipeline.core import distributed, registry
from pipeline.core.config import TrainSettings
from pipeline.core.devices import FEATURE_BUDGET, autocast, compiling
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore, open_store, write_store
from pipeline.decoding.beam import beam_search
from pipeline.encoders.images import FileLoader, jpeg_decoder
from pipeline.evaluation.metrics import score_captions
from pipeline.models import architecture
from pipeline.models.base import trainable_parameters
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap.mapper import build_mapper
from pipeline.models.viclipcap.retrieval import Retrieval
from pipeline.training import scst
from pipeline.training.batches import CaptionSet
from pipeline.training.cider import CiderD
from pipeline.training.cross_entropy import CrossEntropy, compile_forward
from pipeline.training.optimisation import Optimisation

# (viclip, reference) workload sizes, in images, per device type.
SIZES = {
    "cpu": {"extract": (64, 8), "train": (40, 24), "decode": (16, 2)},
    "cuda": {"extract": (20480, 64), "train": (3769, 64), "decode": (558, 8)},
}
EXTRACT_FILES = 4096  # distinct JPEG files the extract case writes
SCALING = (1_000, 10_000, 100_000)  # stored images
BEAM = 5
MAX_LENGTH = workload.TOKENS[1]  # random weights never stop early: every caption runs to full length

Case = tuple[Callable[[], Any], dict[str, float]]  # the timed work, and what it processes


def _batch_size() -> int:
    return workload.params().train.viclipcap.batch_size


def extract(device: torch.device, impl: str) -> Case:
    """impl viclip: extraction as `viclip extract` runs it on this device (JPEG files decoded on the device or by
    Pillow in the loader's workers: `devices.jpegs_on_device`); workers: by Pillow, whatever the device;
    reference: the reference's."""
    count = SIZES[device.type]["extract"][impl == "reference"]
    encoder = workload.clip_encoder(device)
    folder = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the images live as long as the case's process
    # Each listed file is read, decoded and encoded: 4,096 files listed five times are the work of 20,480,
    # without the GPU machine spending minutes writing JPEGs.
    written = workload.write_images(Path(folder), min(count, EXTRACT_FILES))
    files = [written[n % len(written)] for n in range(count)]
    if impl != "reference":
        if impl == "workers":
            os.environ["VICLIP_DEVICE_JPEGS"] = "off"  # read by the loader, in this case's process
        workers = min(16, torch.get_num_threads() if device.type == "cpu" else 16)
        loader = FileLoader(encoder, files, 64, workers, device)
        list(loader.encode(range(64)))  # warm-up: the workers start, kernels and allocator at the batch size
        return (lambda: list(loader.encode())), {"images": count, "jpeg_decoder": jpeg_decoder(encoder, device)}
    reference.extract(encoder, files[:1], 1, device)  # warm-up: kernels, allocator
    return (lambda: reference.extract(encoder, files, workload.CAPTIONS_PER_IMAGE, device)), {"images": count}


def caption_set(captions: workload.Captions, captioner, device: torch.device,
                records: list[ImageRecord] | None = None) -> CaptionSet:
    """The captions of `records` (default: all), each image's embedding in the store."""
    store = FeatureStore(Path("synthetic"), np.arange(len(captions.records)), {}, rows=captions.embeddings)
    return CaptionSet.build(captions.records if records is None else records, store, captions.encode,
                            captioner.max_tokens, device)


def _optimisation(captioner, data: CaptionSet) -> Optimisation:
    """viclip's optimiser, scheduler and precision policy, at ClipCap's learning rate, over one epoch."""
    settings = TrainSettings(epochs=1, patience=1, batch_size=_batch_size(), lr=2e-5, weight_decay=0.0,
                             warmup_steps=0, grad_clip=None)
    return Optimisation.build(captioner, settings, -(-len(data) // _batch_size()), data.tokens.device)


def _viclip_epoch(captioner, data: CaptionSet, compiled: nn.Module | None = None) -> None:
    """One epoch as `viclip train` runs it: eagerly, or through `compiled` (`compile_forward`'s)."""
    objective = CrossEntropy({"train": data}, _batch_size(), compiled)
    objective.epoch(captioner, _optimisation(captioner, data), torch.Generator().manual_seed(0), "train")


def _padded(captions: workload.Captions) -> tuple[torch.Tensor, torch.Tensor]:
    """One embedding row per caption and its tokens padded with 0 to the dataset's longest, made once
    before training, as the reference's tokenised-caption cache is (and as viclip's CaptionSet is)."""
    texts = [(r.image_id, t) for r in captions.records for t in r.captions]
    tokens = torch.zeros(len(texts), workload.TOKENS[1], dtype=torch.long)
    for n, (_, text) in enumerate(texts):
        ids = captions.tokens[text]
        tokens[n, : len(ids)] = torch.tensor(ids)
    return torch.from_numpy(captions.embeddings[[i for i, _ in texts]]), tokens


def _reference_epoch(captioner, embeddings: torch.Tensor, tokens: torch.Tensor, device: torch.device) -> None:
    """One pass in fixed-length batches; the LM's weights get gradients (the caller unfreezes them)."""
    optimizer = torch.optim.AdamW(captioner.mapper.parameters(), lr=2e-5)
    captioner.train()
    for start in range(0, len(tokens), _batch_size()):
        batch = slice(start, start + _batch_size())
        reference.train_step(captioner, embeddings[batch].to(device), tokens[batch].to(device), optimizer)


def train(device: torch.device, impl: str) -> Case:
    """impl viclip: the step as `viclip train` runs it on this device (compiled or not, `devices.compiling`);
    eager and compiled: the step either way, whatever the device; reference: the reference's step."""
    images = SIZES[device.type]["train"][impl == "reference"]
    captioner = workload.captioner(device, "reference" if impl == "reference" else "viclip")
    captions = workload.captions(images)
    counts = {"captions": images * workload.CAPTIONS_PER_IMAGE,
              "tokens": sum(len(t) for t in captions.tokens.values())}
    warm_up = workload.captions(8, seed=1)  # one batch
    if impl != "reference":
        data = caption_set(captions, captioner, device)
        compiled = impl == "compiled" or (impl == "viclip" and compiling(device))
        forward = compile_forward(captioner, device) if compiled else None
        started = time.perf_counter()
        # Compiled: a whole epoch first, so every static width is compiled before the timed one.
        _viclip_epoch(captioner, data if compiled else caption_set(warm_up, captioner, device), forward)
        counts |= {"compiled": compiled, "warm_up_seconds": time.perf_counter() - started}
        return (lambda: _viclip_epoch(captioner, data, forward)), {**counts, "matrix_flops": _matrix_flops(captioner, data)}
    captioner.lm.model.requires_grad_(True)  # as the reference leaves its "frozen" GPT-2
    _reference_epoch(captioner, *_padded(warm_up), device)
    embeddings, tokens = _padded(captions)
    return (lambda: _reference_epoch(captioner, embeddings, tokens, device)), counts


def profile(device: torch.device, impl: str) -> Case:
    """impl train: one training step (one batch) as `viclip train` runs it on this device, after two warm-up
    steps (a compiled step is compiled, then recorded as CUDA graphs); impl decode: one beam-search batch at the
    score stage's batch size, per step, as `viclip score` runs it (compiled or not). Each under torch.profiler
    (`measure.profiled`)."""
    captioner = workload.captioner(device)
    figures: dict[str, Any] = {"compiled": compiling(device)}
    if impl == "train":
        data = caption_set(workload.captions(_batch_size() // workload.CAPTIONS_PER_IMAGE), captioner, device)
        forward = compile_forward(captioner, device) if figures["compiled"] else None
        for _ in range(2):
            _viclip_epoch(captioner, data, forward)
        work, steps = functools.partial(_viclip_epoch, captioner, data, forward), 1
    else:
        batch = torch.from_numpy(workload.captions(min(workload.params().score.batch_size,
                                                       SIZES[device.type]["decode"][0])).embeddings).to(device)
        # Warm-up: a compiled step is compiled and captured for this batch's shape; an eager one warms its kernels.
        beam_search(captioner, batch if figures["compiled"] else batch[:2], BEAM, MAX_LENGTH, 1.0)
        work, steps = functools.partial(beam_search, captioner, batch, BEAM, MAX_LENGTH, 1.0), MAX_LENGTH
    return (lambda: figures.update(profiled(work, device, steps))), figures


def _matrix_flops(captioner, data: CaptionSet) -> float:
    """Matrix FLOPs of an epoch (batches cut to their longest caption are counted unpadded): the LM's
    forward (blocks on every position, the head on caption positions only) and its backward to the
    activations, about as much again, since the frozen weights get no gradient. The mapper is negligible."""
    lm = captioner.lm.model
    # The decoder blocks: the model's longest list of modules (GPT-2's transformer.h, Qwen2's model.layers).
    blocks = sum(p.numel() for p in max((m for m in lm.modules() if isinstance(m, nn.ModuleList)), key=len).parameters())
    head = lm.get_output_embeddings().weight.numel()
    tokens = float(data.lengths.sum())
    positions = tokens + len(data) * captioner.mapper.prefix_length
    return 2 * 2 * (blocks * positions + head * tokens)


def decode(device: torch.device, impl: str) -> Case:
    """impl viclip: beam search as `viclip score` runs it on this device (its step compiled or not,
    `devices.compiling`); eager and compiled: the step either way, whatever the device; reference: the reference's."""
    images = SIZES[device.type]["decode"][impl == "reference"]
    captioner = workload.captioner(device, "reference" if impl == "reference" else "viclip")
    embeddings = torch.from_numpy(workload.captions(images).embeddings).to(device)
    if impl != "reference":
        compiled = impl == "compiled" or (impl == "viclip" and compiling(device))
        os.environ["VICLIP_COMPILE"] = "on" if compiled else "off"  # read by the captioner, in this case's process
        batch_size = workload.params().score.batch_size
        work = lambda: [beam_search(captioner, b, BEAM, MAX_LENGTH, 1.0) for b in embeddings.split(batch_size)]  # noqa: E731
        started = time.perf_counter()
        if compiled:  # every batch once, so that each batch shape is compiled (and captured) before the timed run
            work()
        else:
            beam_search(captioner, embeddings[:2], BEAM, MAX_LENGTH, 1.0)
        return work, {"captions": images, "compiled": compiled, "warm_up_seconds": time.perf_counter() - started}
    reference.beam_search(captioner, embeddings[0], BEAM, 4)  # warm-up
    return (lambda: [reference.beam_search(captioner, e, BEAM, MAX_LENGTH) for e in embeddings]), {"captions": images}


def score(device: torch.device, impl: str) -> Case:
    """The score stage's scorer on a KTVIC-sized test split of syllable text."""
    rng = np.random.default_rng(0)
    syllables = [f"s{n}" for n in range(3000)]

    def sentence() -> str:
        return " ".join(rng.choice(syllables, size=int(rng.integers(15, 26))))

    references = {i: [sentence() for _ in range(workload.CAPTIONS_PER_IMAGE)] for i in range(workload.TEST_IMAGES)}
    predictions = {i: sentence() for i in references}
    return (lambda: score_captions(references, predictions)), {"images": workload.TEST_IMAGES}


def scaling_train(device: torch.device, impl: str, images: int, steps: int = 2) -> Case:
    """A few training steps drawn from a store of `images` images, kept on the device."""
    captioner = workload.captioner(device)
    data = caption_set(workload.captions(images), captioner, device)
    optimisation = _optimisation(captioner, data)

    def some_steps() -> None:
        captioner.train()
        batches = data.batches(_batch_size(), torch.Generator().manual_seed(0))
        for _, (features, tokens, mask, weight) in zip(range(steps), batches):
            with autocast(device, optimisation.policy):
                loss = captioner.loss(features, tokens, mask)
            optimisation.step(captioner, loss * weight)

    some_steps()  # warm-up
    return some_steps, {"steps": steps, "captions": len(data), "store_mb": _megabytes(data)}


def scaling_decode(device: torch.device, impl: str, images: int) -> Case:
    """One decode batch drawn from a store of `images` embeddings on the device."""
    captioner = workload.captioner(device)
    embeddings = torch.from_numpy(workload.captions(images).embeddings).to(device)
    batch = embeddings[: min(workload.params().score.batch_size, SIZES[device.type]["decode"][0])]
    beam_search(captioner, batch[:2], BEAM, MAX_LENGTH, 1.0)  # warm-up
    return (lambda: beam_search(captioner, batch, BEAM, MAX_LENGTH, 1.0)), {"batch": len(batch), "images": images}


def processes(device: torch.device, impl: str) -> Case:
    """viclip's train epoch on this process's share of the CPU train workload, under torchrun when launched
    so (benchmarks/__main__.py runs it on 1 and on 2 processes); what is trained is wrapped in DDP."""
    captioner = workload.captioner(device)
    data = caption_set(workload.captions(SIZES[device.type]["train"][0]), captioner, device)
    trained = DistributedDataParallel(captioner) if distributed.world_size() > 1 else captioner
    _viclip_epoch(trained, caption_set(workload.captions(8, seed=1), captioner, device))  # warm-up
    gradient_bytes = sum(p.numel() * 4 for p in captioner.parameters())

    def epoch() -> None:
        _viclip_epoch(trained, data)
        distributed.barrier()  # the slowest rank's time

    return epoch, {"captions": len(data), "processes": distributed.world_size(), "gradient_bytes": gradient_bytes}


def all_reduce(device: torch.device, impl: str) -> Case:
    """One all-reduce of as many fp32 values as the mapper has parameters: what DDP exchanges each step."""
    count = sum(p.numel() for p in workload.captioner(device).parameters())
    values = torch.ones(count, device=device)
    torch.distributed.all_reduce(values)  # warm-up
    return (lambda: [torch.distributed.all_reduce(values) for _ in range(3)]), {"bytes": count * 4, "repeats": 3}


def streamed_train(device: torch.device, impl: str, images: int, steps: int = 10) -> Case:
    """Steps of the baseline (CNN grids, ~200 KB an image) trained from a store on disk, held in memory
    (impl "memory") or read batch by batch (impl "disk"); the peak memory is the figure."""
    folder = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    config = workload.params()
    rng = np.random.default_rng(0)
    records = [ImageRecord(i, Path(f"{i}.jpg"), tuple(" ".join(f"s{w}" for w in rng.integers(0, 3000, 20))
                                                       for _ in range(workload.CAPTIONS_PER_IMAGE)))
               for i in range(images)]
    grid = (config.cnn.grid ** 2, 2048)
    with write_store(folder / "train.h5", {}, "float16") as store:
        for start in range(0, images, 256):  # written in pieces: the store is never in memory whole
            rows = range(start, min(start + 256, images))
            store.append(np.array(rows), rng.standard_normal((len(rows), *grid), dtype=np.float32).astype(np.float16))
    if impl == "disk":
        os.environ[FEATURE_BUDGET] = "0"
    model = architecture("cnn_lstm").build(registry.model("cnn_lstm").sections(config), records, None,
                                           {"embedding_dim": grid[1]}, device)
    data = CaptionSet.build(records, open_store(folder / "train.h5", {}), model.encode, None, device)
    settings = config.train.cnn_lstm
    optimisation = Optimisation.build(model, settings, steps, device)

    def some_steps(count: int = steps) -> None:
        model.train()
        batches = data.batches(settings.batch_size, torch.Generator().manual_seed(0))
        for _, (features, tokens, mask, weight) in zip(range(count), batches):
            optimisation.step(model, model.loss(features, tokens, mask) * weight)

    some_steps(1)  # warm-up
    return some_steps, {"steps": steps, "images": images, "store_mb": images * np.prod(grid) * 2 / 2**20,
                        "streamed": not isinstance(data.features, torch.Tensor)}


def _megabytes(data: CaptionSet) -> float:
    tensors = (data.features, data.image_rows, data.tokens, data.device_lengths)
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# The variants timed, each MODEL[:LM_TRAIN]: every registered ViCLIPCap model as params.yaml defines it, and
# viclipcap with the LM under LoRA. The first, viclipcap (cross-entropy, the LM frozen), is the reference.
VARIANTS = (registry.DEFAULT_MODEL, *(name for name, model in registry.MODELS.items()
                                     if model.architecture == "viclipcap" and name != registry.DEFAULT_MODEL),
            "viclipcap:lora")


@dataclass(frozen=True)
class VariantSize:
    """A variant case's size: KTVIC's, at the benchmarked LM's full shape by default; a test runs a tiny one."""

    steps: int = 3  # timed steps, after one of warm-up
    corpus: int = workload.TRAIN_IMAGES  # training images: the retrieval datastore and the CIDEr-D corpus
    layers: int | None = None  # the LM's blocks; None: its shape's
    width: int | None = None  # the LM's width (and the mapper's output); None: its shape's
    batch: int | None = None  # captions a cross-entropy step, images an SCST step; None: train.<model>.batch_size

    def args(self) -> list[str]:
        """The case's arguments (`python -m benchmarks.case variant MODEL ARGS`), "-" for None."""
        return ["-" if n is None else str(n) for n in astuple(self)]


class Stopwatch:
    """Seconds spent inside wrapped functions, by name, a list entry per timed step (calls before the first
    `lap` are not counted: the warm-up)."""

    def __init__(self, device: torch.device, names: tuple[str, ...]):
        self.device = device
        self.seconds: dict[str, list[float]] = {name: [] for name in names}

    def lap(self) -> None:
        for laps in self.seconds.values():
            laps.append(0.0)

    def wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._synchronize()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self._synchronize()
            if self.seconds[name]:
                self.seconds[name][-1] += time.perf_counter() - start
            return result

        return timed

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def variant(device: torch.device, impl: str, steps: int, corpus_images: int, layers: int | None, width: int | None,
            batch: int | None = None) -> Case:
    """Training steps of ViCLIPCap's variant `impl` (one of VARIANTS): the sections that define its model
    (mapper, retrieval, what of the LM trains) and its train settings, in front of the benchmarked LM with random
    weights (`layers` blocks `width` wide where given), on a synthetic training split of `corpus_images` images (the retrieval datastore, SCST's CIDEr-D
    corpus). One warm-up step, then `steps` steps, each an epoch of its objective (what the trainer runs) on one batch. The
    work fills in each step's seconds (`seconds`: `step`, and SCST's `sample` and `reward`) and the size of
    the optimiser's state."""
    model, _, lm_train = impl.partition(":")
    config = workload.params()
    sections, scst_model = registry.model(model).sections(config), registry.model(model).objective == "scst"
    settings = getattr(config.train, model)
    if batch is not None:
        settings = settings.model_copy(update={"batch_size": batch})
    captions = workload.captions(corpus_images)  # caption token ids, and unit image embeddings
    references = corpus(corpus_images)  # syllable text, five an image: the datastore's captions, SCST's references
    retrieval = Retrieval(workload.datastore(captions.embeddings, [r[0] for r in references], device), config.retrieval)
    texts = [retrieval.prompt(r[: retrieval.settings.k]) for r in references[:1000]]
    lm = workload.language_model(device, tokenizer=workload.tokenizer(texts), layers=layers, width=width,
                                 train=lm_train or sections["lm"].train)
    torch.manual_seed(0)
    mapper = build_mapper(sections["mapper"], captions.embeddings.shape[1], lm.width).to(device)
    captioner = Captioner(mapper, lm, retrieval if sections.get("retrieval") is not None else None)

    watch = Stopwatch(device, ("step", "sample", "reward"))
    figures: dict[str, Any] = {"seconds": watch.seconds, "trained_parameters": trainable_parameters(captioner)}
    optimisation = Optimisation.build(captioner, settings, steps + 1, device)
    generator = torch.Generator().manual_seed(0)
    if scst_model:
        images = scst.ImageSet(torch.from_numpy(captions.embeddings[: settings.batch_size]).to(device),
                               CiderD(references))  # the split's first images, rows of a corpus of them all
        images.cider.scores = watch.wrap("reward", images.cider.scores)
        objective = scst.SelfCritical(captioner, {"train": images}, settings, config.score)
        step = lambda n: objective.epoch(captioner, optimisation, generator, model)  # noqa: E731
        figures.update(images=len(images), samples=settings.samples, max_length=settings.max_length, sampled=[])
        # scst_epoch finds `sample` in its module: timed there while the timed steps run.
        timing = mock.patch.object(scst, "sample", watch.wrap("sample", _recording(scst.sample, figures["sampled"])))
    else:
        per_step = max(settings.batch_size // workload.CAPTIONS_PER_IMAGE, 1)  # images
        batches = [caption_set(captions, captioner, device, captions.records[n * per_step: (n + 1) * per_step])
                   for n in range(steps + 1)]
        objectives = [CrossEntropy({"train": batch}, len(batch)) for batch in batches]
        step = lambda n: objectives[n].epoch(captioner, optimisation, generator, model)  # noqa: E731
        figures.update(captions=len(batches[0]), positions=[_positions(captioner, b) for b in batches[1:]])
        timing = contextlib.nullcontext()
    step = watch.wrap("step", step)
    step(0)  # warm-up

    def work() -> None:
        with timing:
            for n in range(1, steps + 1):
                watch.lap()
                step(n)
        figures["optimizer_mb"] = sum(t.numel() * t.element_size() for state in optimisation.optimizer.state.values()
                                      for t in state.values() if torch.is_tensor(t)) / 2**20

    return work, figures


def _recording(sample: Callable, sampled: list[dict]) -> Callable:
    """`scst.sample`, noting each call's sampled tokens: the longest, and the mean (the stop included)."""
    def recorded(*args, **kwargs):
        tokens, lengths = sample(*args, **kwargs)
        sampled.append({"longest": tokens.shape[1], "mean": float(lengths.float().mean())})
        return tokens, lengths

    return recorded


@torch.no_grad()
def _positions(captioner: Captioner, batch: CaptionSet) -> int:
    """The LM positions a step on `batch` runs: each caption's context (prefix, prompt) and its tokens, padded."""
    features = batch.rows(torch.arange(len(batch), device=batch.tokens.device))
    return len(batch) * (captioner.context(features)[0].shape[1] + int(batch.lengths.max()))


CASES: dict[str, Callable[..., Case]] = {
    "extract": extract, "train": train, "decode": decode, "score": score, "profile": profile,
    "scaling_train": scaling_train, "scaling_decode": scaling_decode, "processes": processes,
    "all_reduce": all_reduce, "streamed_train": streamed_train, "variant": variant,
}
