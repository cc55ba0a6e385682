"""extract, train and decode on CUDA through the real stage code, each against the same work on the CPU.

Run by `make gpu-check` on a GPU machine; the CUDA tests are skipped wherever CUDA is absent (CI,
the CPU suite), where one test runs the same check CPU against CPU instead. The project is small and built here: a synthetic KTVIC-layout dataset (200 train, 40 test images), the
demo's tiny CLIP and tiny GPT-2 (pre-trained on the CPU in this run), the demo's params. It uses no
DVC and no scorer (pycocoevalcap, Java), so it runs on a stock PyTorch image.

Every check is a plain function of `torch.device`s, so the whole flow also runs on a CPU against
itself, without pytest (the repository root on PYTHONPATH):

    python tests/gpu/test_cuda.py            # cpu against cpu: a dry run of what the GPU runs
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from pipeline.core import devices, paths, registry
from pipeline.core.config import Config, TrainSettings, parse_config
from pipeline.core.devices import autocast
from pipeline.core.io import read_json
from pipeline.data.datasets import load_splits, read_source
from pipeline.data.features import open_store
from pipeline.decoding.beam import caption_features
from pipeline.demo import demo_params
from pipeline.demo.synthetic import caption_groups, make_dataset
from pipeline.demo.tiny import make_tiny_clip, make_tiny_lm
from pipeline.encoders.base import split_preprocess
from pipeline.evaluation.text import protocol_text
from pipeline.models import CONFIG, load_model
from pipeline.training.batches import CaptionSet
from pipeline.training.cross_entropy import CrossEntropy, compile_forward, train_epoch
from pipeline.training.optimisation import Optimisation
import stages.extract
import stages.train
from tests.test_encoders import JPEG_MAX_GAP, JPEG_MEAN_GAP, jpeg_gaps

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
TRAIN_IMAGES, TEST_IMAGES = 200, 40
# The demo's training, pinned here so that a change to the demo's length does not change this check's.
TRAINING = {"epochs": 20, "patience": 20}

# Extraction on CUDA runs CLIP under bf16 autocast, the CPU in fp32. bf16 keeps 8 bits of mantissa
# (relative rounding 2^-9, 0.2% per operation), and the error grows through the tiny ViT's layers:
# on this project's CPU, bf16 autocast against fp32 moved the unit-length 64-d embeddings by at most
# 0.0046 in any coordinate (typical size 0.1), and no row's cosine with its fp32 twin fell below
# 0.9999. The bounds leave 4x and 10x room for a GPU's other kernels. A real fault is far outside
# them: two different images' embeddings have a cosine of 0.11 on average.
EMBEDDING_ATOL = 0.02
EMBEDDING_MIN_COSINE = 0.999
# Best validation loss, CUDA against CPU. The same seed, initial weights and batch order; only the
# arithmetic differs (bf16 on the GPU; bf16 or fp32 on a CPU, as the CPU allows). On this project's
# CPU, fp32 and bf16 training ended 3.6% apart (0.345 and 0.332 nats); after one epoch the
# validation loss is still 0.50, 44% above the best.
VAL_LOSS_RTOL = 0.10
# Captions of one trained model from the same features, decoded on both devices: the share of test
# images whose captions agree.
MIN_AGREEMENT = 0.95
# Under bf16 autocast, exact agreement is not a property of the code: the synthetic captions are five
# templates of near-equal probability and the tiny models barely tell "one" from "three", so a
# perturbation of the scores flips near-ties, at the last step or when beams are pruned. On this
# project's CPU, bf16 against fp32 decoding gave the same caption for 31 to 34 of 40 images (three
# trained models); each other caption scored, under the fp32 model, within 0.065 nats per token of
# the fp32 one. So under autocast a different caption still agrees when it scores within NEAR_TIE of
# the CPU's (which score 0.25 to 0.3 nats per token). A bf16 fault (NaN or overflowing scores, a
# broken cache) gives captions far less likely than that, or no sentences at all (checked below).
NEAR_TIE = 0.15
# Share of the test images whose caption is, word for word, a training caption: the tiny models learn
# the synthetic templates (all 40 in the dry run on this project's CPU). Decoding that lost its
# context writes no such sentence, on either device alike, so agreement cannot show it; this can.
MIN_TRAINING_SENTENCES = 0.5


def report(check: str, **figures: Any) -> None:
    """One line of figures, printed as soon as a check has them (make gpu-check tees them to a log)."""
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"gpu-check {check}: {shown}", flush=True)


def build_project(root: Path, tiny: Path | None = None) -> dict[str, Any]:
    """Synthetic data and the demo's tiny models under `root`; the demo's params pointing at them. With
    `tiny` (a folder as `pipeline.demo.prepare` writes it), its tiny models instead of new ones: they were
    pre-trained on the demo's training captions, of which these are the first (the same seed)."""
    started = time.perf_counter()
    data = make_dataset(root / "ktvic", TRAIN_IMAGES, TEST_IMAGES)
    params = demo_params()
    if tiny is None:
        train = read_source(data).splits["train"]
        clip_config, clip_weights = make_tiny_clip(root / "models/clip", [(r.path, c) for r in train for c in r.captions])
        lm = make_tiny_lm(caption_groups(data), root / "models/lm")
    else:
        clip_config, clip_weights, lm = (tiny / params[s][k] for s, k in (("clip", "config"), ("clip", "pretrained"),
                                                                          ("lm", "name")))
    params["data"]["root"] = str(data)
    params["clip"].update(pretrained=str(clip_weights), config=str(clip_config))
    params["lm"]["name"] = str(lm)
    params["train"][registry.DEFAULT_MODEL].update(TRAINING)
    report("build", train_images=TRAIN_IMAGES, test_images=TEST_IMAGES, seconds=time.perf_counter() - started)
    return params


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make `best_device()` answer `device` in every loaded module that asks it: the stages choose
    their own device, and a GPU machine must run them on its CPU too."""
    modules = [m for name, m in list(sys.modules.items()) if name.split(".")[0] in ("pipeline", "stages")
               and getattr(m, "best_device", None) is devices.best_device]
    with ExitStack() as patches:
        for module in modules:
            patches.enter_context(mock.patch.object(module, "best_device", lambda: device))
        yield


def run_stages(params: dict[str, Any], out: Path, device: torch.device) -> Config:
    """The real extract and train stages on `device`, writing under `out`; returns their config."""
    for section, folder in (("extract", "features"), ("train", "models")):
        params = {**params, section: {**params[section], "out": str(out / folder)}}
    config = parse_config(params, source=f"gpu check on {device}")
    cuda = device.type == "cuda"
    with on_device(device):
        if cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        print(stages.extract.run(config), flush=True)
        # Proof that CLIP ran on the GPU: the store itself does not say where it was made.
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        report(f"extract on {device}", seconds=time.perf_counter() - started, cuda_peak_mb=peak)
        assert peak != 0, "extraction allocated no CUDA memory: it did not run on the GPU"
        print(stages.train.run(config), flush=True)
    return config


def trained(config: Config) -> dict[str, Any]:
    """How the model's training went, as its config.json records it."""
    return read_json(paths.model_dir(config) / CONFIG)["training"]


def check_extraction(reference: Config, other: Config) -> dict[str, float]:
    """Every split's stored embeddings match, row for row, within the bf16 bounds above."""
    worst = {"max_abs_diff": 0.0, "min_cosine": 1.0}
    for split in ("train", "val", "test"):
        ours, theirs = (open_store(paths.store_path(c, split), {}) for c in (reference, other))
        assert np.array_equal(ours.image_ids, theirs.image_ids), f"{split}: stores hold different images"
        assert ours.attrs["embedding_dim"] == theirs.attrs["embedding_dim"]
        a, b = ours.embeddings.astype(np.float64), theirs.embeddings.astype(np.float64)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        worst["max_abs_diff"] = max(worst["max_abs_diff"], float(np.abs(a - b).max()))
        worst["min_cosine"] = min(worst["min_cosine"], float(cosine.min()))
    report("extract", **worst, atol=EMBEDDING_ATOL, min_cosine_allowed=EMBEDDING_MIN_COSINE)
    assert worst["max_abs_diff"] <= EMBEDDING_ATOL, worst
    assert worst["min_cosine"] >= EMBEDDING_MIN_COSINE, worst
    return worst


def check_training(reference: Config, reference_device: torch.device, other: Config, device: torch.device) -> dict:
    """Each run trained where it was asked to, and both reached about the same best validation loss."""
    ours, theirs = trained(reference), trained(other)
    for spec, where in ((ours, reference_device), (theirs, device)):
        assert spec["device"] == devices.hardware(where), f"trained on {spec['device']}, not {where}"
        assert math.isfinite(spec["val_loss"]), spec
    gap = abs(theirs["val_loss"] - ours["val_loss"]) / ours["val_loss"]
    figures = {"val_loss_reference": ours["val_loss"], "val_loss": theirs["val_loss"], "relative_gap": gap,
               "precision": theirs.get("precision"), "best_epoch": theirs["best_epoch"],
               "seconds_reference": ours["train_seconds"], "seconds": theirs["train_seconds"]}
    report(f"train on {device}", **figures)
    assert gap <= VAL_LOSS_RTOL, figures
    return figures


@contextmanager
def precision(device: torch.device, name: str) -> Iterator[None]:
    """fp32: fp32 LM weights, no autocast and no TF32, so the GPU multiplies in full fp32 as the CPU does;
    policy: the LM's weights held as the device holds them (`devices.frozen_dtype`), under the autocast that
    training uses on `device`."""
    if name == "policy":
        with autocast(device, devices.precision(device)):
            yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False), mock.patch.dict(os.environ, {"VICLIP_FROZEN_PRECISION": "fp32"}):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def decode(config: Config, device: torch.device, precision_name: str = "fp32") -> tuple[list[str], bool]:
    """The trained model's captions of the test split, decoded on `device` at the given precision, and
    whether that ran in half precision (autocast, or half-precision LM weights)."""
    started = time.perf_counter()
    with precision(device, precision_name):
        model, spec = load_model(paths.model_dir(config), device)
        features = torch.from_numpy(open_store(paths.store_path(config, "test"), spec.store_attrs).embeddings).to(device)
        autocast_on = torch.is_autocast_enabled(device.type) or model.lm.held != torch.float32
        captions = caption_features(model, features, config.score)
    texts = captions.texts
    report(f"decode on {device} ({precision_name})", autocast=autocast_on, images=len(texts),
           distinct_captions=len(set(texts)), seconds=time.perf_counter() - started)
    return texts, autocast_on


@torch.no_grad()
def caption_losses(config: Config, captions: list[str]) -> list[float]:
    """Each test image's caption scored by the trained model in fp32 on the CPU: mean negative
    log-likelihood per token, end token included (beam search ranks by its negative, at length
    penalty 1)."""
    model, spec = load_model(paths.model_dir(config), CPU)
    features = torch.from_numpy(open_store(paths.store_path(config, "test"), spec.store_attrs).embeddings)
    losses = []
    for row, ids in enumerate(model.encode(captions)):
        tokens = torch.tensor([ids])
        losses.append(model.loss(features[row : row + 1], tokens, torch.ones_like(tokens, dtype=torch.bool)).item())
    return losses


def check_sentences(config: Config, captions: list[str]) -> float:
    """Most captions are sentences of the training set. This guards what agreement between devices
    cannot: a library on this machine that decodes wrongly on both (transformers 5.17 ignores an
    unknown keyword such as `cache=`, and the LM then decodes each token without its context)."""
    known = {protocol_text(c) for r in load_splits(config.data)["train"] for c in r.captions}
    share = sum(protocol_text(c) in known for c in captions) / len(captions)
    report("decoded training sentences", share=share, distinct=len(set(captions)), example=captions[0])
    assert share >= MIN_TRAINING_SENTENCES, f"{share:.0%} are training sentences; some captions: {captions[:3]}"
    return share


def check_decoding(config: Config, reference: list[str], captions: list[str], near_tie: float, label: str) -> float:
    """At least MIN_AGREEMENT of the test images get the same caption, or one that scores within
    `near_tie` nats per token of the reference caption under the fp32 model."""
    assert len(captions) == len(reference)
    differ = [row for row, (a, b) in enumerate(zip(reference, captions)) if a != b]
    gaps = {}
    if differ:
        ours, theirs = caption_losses(config, reference), caption_losses(config, captions)
        gaps = {row: theirs[row] - ours[row] for row in differ}
    agree = len(captions) - sum(gap > near_tie for gap in gaps.values())
    agreement = agree / len(captions)
    worst = max(gaps, key=gaps.get, default=None)
    report(f"decode agreement ({label})", agreement=agreement, exact=1 - len(differ) / len(captions),
           near_tie_allowed=near_tie, worst_gap=gaps.get(worst),
           worst=None if worst is None else f"{reference[worst]!r} -> {captions[worst]!r}")
    assert agreement >= MIN_AGREEMENT, [(reference[r], captions[r], gaps[r]) for r in differ]
    return agreement


def check_all(root: Path, device: torch.device, reference_device: torch.device = CPU, tiny: Path | None = None) -> None:
    """The whole check, outside pytest: `device` against `reference_device` (cpu against cpu for a dry run)."""
    params = build_project(root, tiny)
    reference = run_stages(params, root / "reference", reference_device)
    # A dry run (cpu against cpu) checks the check's own code: the run against itself, not a second one.
    other = reference if device == reference_device else run_stages(params, root / "device", device)
    check_extraction(reference, other)
    check_training(reference, reference_device, other, device)
    expected, _ = decode(other, reference_device)
    check_sentences(other, expected)
    for name in ("fp32", "policy"):
        captions, autocast_on = decode(other, device, name)
        check_decoding(other, expected, captions, NEAR_TIE if autocast_on else 0.0, name)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on a GPU machine)")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests below run the same check for real")
def test_the_check_itself_runs_cpu_against_cpu(tmp_path, tiny):
    """CI has no GPU: this keeps the check's own code running against today's pipeline (on the suite's tiny
    models: building them is the tiny fixture's test)."""
    check_all(tmp_path, CPU, tiny=tiny)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("gpu-check")
    return root, build_project(root)


@pytest.fixture(scope="module")
def cpu_run(project) -> Config:
    root, params = project
    return run_stages(params, root / "cpu", CPU)


@pytest.fixture(scope="module")
def cuda_run(project) -> Config:
    root, params = project
    return run_stages(params, root / "cuda", CUDA)


@pytest.fixture(scope="module")
def cpu_captions(cuda_run) -> list[str]:
    """The model trained on CUDA, decoded on the CPU in fp32: what CUDA decoding must reproduce."""
    return decode(cuda_run, CPU)[0]


@cuda
def test_extraction_on_cuda_matches_the_cpu(cpu_run, cuda_run):
    check_extraction(cpu_run, cuda_run)


@cuda
def test_training_on_cuda_matches_the_cpu(cpu_run, cuda_run):
    check_training(cpu_run, CPU, cuda_run, CUDA)


@cuda
def test_decoded_captions_are_sentences_of_the_training_set(cuda_run, cpu_captions):
    check_sentences(cuda_run, cpu_captions)


@cuda
@pytest.mark.parametrize("precision_name", ["fp32", "policy"])
def test_decoding_on_cuda_matches_the_cpu(cuda_run, cpu_captions, precision_name):
    captions, autocast_on = decode(cuda_run, CUDA, precision_name)
    check_decoding(cuda_run, cpu_captions, captions, NEAR_TIE if autocast_on else 0.0, precision_name)


def caption_sets(config: Config, device: torch.device):
    """The trained model on `device`, and its training captions: all of them, and a 16-image share."""
    model, spec = load_model(paths.model_dir(config), device)
    records = load_splits(config.data)["train"]
    store = open_store(paths.store_path(config, "train"), spec.store_attrs)
    return model, [CaptionSet.build(r, store, model.encode, model.max_tokens, device) for r in (records[:16], records)]


# Clipping and warm-up on: their arithmetic runs on the device too.
SYNC_CHECK = TrainSettings(epochs=1, patience=1, batch_size=40, lr=2e-5, weight_decay=0.0, warmup_steps=2, grad_clip=1.0)


def epoch_waits(model, data, device: torch.device, forward=None) -> int:
    """Times the host waits for the GPU in one training epoch, as CUDA's sync debug mode counts them."""
    settings = SYNC_CHECK
    optimisation = Optimisation.build(model, settings, 10**4, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(forward or model, data, settings.batch_size, optimisation, torch.Generator().manual_seed(0),
                        "sync check", compiled=forward is not None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda
@pytest.mark.parametrize("step", ["eager", "compiled"])
def test_a_training_epoch_waits_for_the_gpu_as_often_however_many_steps_it_has(cuda_run, step):
    """The host waits only to set an epoch up and to read its loss: never once a step."""
    model, (few, many) = caption_sets(cuda_run, CUDA)
    forward = compile_forward(model, CUDA) if step == "compiled" else None
    for _ in range(2):  # every shape of either: compiled, then recorded as CUDA graphs on its second run
        for data in (few, many):
            epoch_waits(model, data, CUDA, forward)
    waits = [epoch_waits(model, data, CUDA, forward) for data in (few, many)]
    report(f"host waits an epoch ({step})", few_steps=-(-len(few) // SYNC_CHECK.batch_size), waits_few=waits[0],
           many_steps=-(-len(many) // SYNC_CHECK.batch_size), waits_many=waits[1])
    assert waits[0] == waits[1], waits


@cuda
def test_the_compiled_step_trains_as_the_eager_one_on_cuda(cuda_run):
    losses = []
    for step in ("eager", "compiled"):
        model, (_, data) = caption_sets(cuda_run, CUDA)
        objective = CrossEntropy({"train": data}, 40)
        if step == "compiled":
            objective.compile(model, CUDA)
        settings = cuda_run.train.viclipcap
        optimisation = Optimisation.build(model, settings, 2 * objective.steps, CUDA)
        started = time.perf_counter()
        losses.append([objective.epoch(model, optimisation, torch.Generator().manual_seed(e), step) for e in range(2)])
        report(f"two epochs ({step})", seconds=time.perf_counter() - started, losses=losses[-1])
    assert all(abs(c / e - 1) < 0.01 for e, c in zip(*losses)), losses


@cuda
def test_the_frozen_lm_is_held_in_the_policys_half_precision(cuda_run):
    model, _ = load_model(paths.model_dir(cuda_run), CUDA)
    dtypes = {p.dtype for n, p in model.lm.model.named_parameters() if "ln_" not in n}
    assert dtypes == {devices.frozen_dtype(CUDA)}, dtypes  # bf16 on an H100
    assert {p.dtype for p in model.mapper.parameters()} == {torch.float32}


@cuda
def test_the_compiled_decoding_step_decodes_as_the_eager_one_on_cuda(cuda_run, monkeypatch):
    """fp32 weights, TF32 off: the static cache's captured step (`static_steps`) gives the eager path's captions."""
    texts = {}
    for step, setting in (("eager", "off"), ("compiled", "on")):
        monkeypatch.setenv("VICLIP_COMPILE", setting)
        texts[step], _ = decode(cuda_run, CUDA)
    differ = [(a, b) for a, b in zip(texts["eager"], texts["compiled"]) if a != b]
    report("compiled decoding against eager (fp32)", images=len(texts["eager"]), differ=len(differ))
    assert not differ, differ[:3]


@cuda
def test_jpegs_decoded_by_nvjpeg_are_pillows_pixels_within_a_few_levels(tmp_path):
    """The bounds the CPU suite holds torchvision's CPU decoder to (tests/test_encoders.py), here on nvJPEG, with
    ViT-B/32's preprocess, on the extract benchmark's JPEGs."""
    import open_clip

    from benchmarks.workload import write_images

    preprocess, _ = split_preprocess(open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)[2])
    gaps = jpeg_gaps(preprocess, write_images(tmp_path, 8), CUDA)
    report("nvJPEG against Pillow (levels of 255)", largest=max(g for g, _ in gaps), largest_mean=max(m for _, m in gaps))
    assert all(most <= JPEG_MAX_GAP and mean < JPEG_MEAN_GAP for most, mean in gaps), gaps


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        check_all(Path(folder), torch.device(sys.argv[1]) if len(sys.argv) > 1 else CPU)
