"""Stage 3: decode the test split with a trained model (either one) and score it under the stated protocols."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pipeline import distributed, paths
from pipeline.config import Config
from pipeline.data import load_splits
from pipeline.decoding import caption_features
from pipeline.devices import best_device
from pipeline.errors import ViclipError
from pipeline.features import FeatureStore, open_store
from pipeline.io import read_json, write_json
from pipeline.metrics import laid_out, score_captions
from pipeline.models import family, load_model
from pipeline.protocols import chosen

UNFINISHED_WARNING = 0.05  # the share of captions cut at max_length that says the model does not stop


def test_references(config: Config) -> dict[int, list[str]]:
    return {r.image_id: list(r.captions) for r in load_splits(config.data)["test"]}


def read_results(path: str | Path) -> dict[int, str]:
    """A COCO results file: a JSON list of {"image_id", "caption"}."""
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, list):
        raise ViclipError(f"{path}: expected a JSON list of {{\"image_id\", \"caption\"}}")
    results: dict[int, str] = {}
    for n, entry in enumerate(raw):
        if not (isinstance(entry, dict) and isinstance(entry.get("image_id"), int)
                and isinstance(entry.get("caption"), str)):
            raise ViclipError(f"{path}: entry {n} needs an integer 'image_id' and a string 'caption'")
        if entry["image_id"] in results:
            raise ViclipError(f"{path}: entry {n}: second caption for image id {entry['image_id']}")
        results[entry["image_id"]] = entry["caption"]
    return results


def stored(references: dict[int, list[str]], store: FeatureStore) -> dict[int, list[str]]:
    """The references of the images in `store`: those `viclip score` decodes (extraction may skip some)."""
    ids = set(store.image_ids.tolist())
    return {i: refs for i, refs in references.items() if i in ids}


def score_file(config: Config, captions_file: str | Path, protocol: str | None = None) -> dict:
    """Score an existing results file against the test references, without decoding, under `protocol`
    (default: score.protocol).

    Where a CLIP store of the test split exists, only its images are scored (the set `viclip score`
    decodes): captions of images that extraction skipped as unreadable are dropped and counted."""
    references = test_references(config)
    predictions = read_results(captions_file)
    dropped: list[int] = []
    store = paths.store_path(config, "test")
    if store.is_file():
        scored = stored(references, open_store(store, {}))
        dropped = [i for i in predictions if i in references and i not in scored]
        references = scored
        predictions = {i: c for i, c in predictions.items() if i not in dropped}
    by_protocol = score_captions(references, predictions, chosen(protocol or config.score.protocol),
                                 str(captions_file))
    return laid_out(by_protocol, model=Path(captions_file).name, split="test", images=len(references), dropped=len(dropped))


def run(config: Config, model_name: str = paths.MODEL, model_dir: str | Path | None = None) -> tuple[dict, str]:
    """Decode the test split with a trained model and score it; `model_dir` overrides where it is read from.

    Under torchrun each rank decodes its share of whole batches, streamed from the store; the main rank
    gathers the captions, scores them once and writes; the others return ({}, "")."""
    started = time.perf_counter()
    model_dir = Path(model_dir or paths.model_dir(config, model_name))
    references = test_references(config)
    device = best_device()
    model, spec = load_model(model_dir, device)
    store = open_store(paths.store_path(config, "test", family(spec.name).encoder), spec.encoder)

    size = config.score.batch_size
    mine = distributed.shard(-(-len(store) // size))
    rows = range(mine.start * size, min(mine.stop * size, len(store)))
    batches = (torch.from_numpy(batch).to(device) for batch in store.slices(rows, size))
    captions = caption_features(model, batches, config.score, total=len(mine))
    shares = distributed.gather((captions.texts, captions.unfinished))
    if not distributed.is_main():
        return {}, ""
    texts, unfinished = [t for share, _ in shares for t in share], sum(n for _, n in shares)
    results = [{"image_id": int(i), "caption": c} for i, c in zip(store.image_ids, texts)]
    predictions = {r["image_id"]: r["caption"] for r in results}
    scored = stored(references, store)
    by_protocol = score_captions(scored, predictions, chosen(config.score.protocol), str(store.path))
    notes: dict[str, str] = {}
    if captions.clamped_from is not None:
        notes["max_length"] = (
            f"score.max_length {captions.clamped_from} capped at {captions.max_length}: "
            "the LM's context holds no more after the prefix (and the longest retrieval prompt)"
        )

    metrics = laid_out(by_protocol, model=spec.name, split="test", images=len(scored), unfinished=unfinished,
                       max_length=captions.max_length, notes=notes)
    write_json(paths.captions_path(config, spec.name), results)
    write_json(paths.metrics_path(config, spec.name), metrics)
    if unfinished > UNFINISHED_WARNING * len(results):
        print(
            f"warning: {unfinished} of {len(results)} captions reached score.max_length "
            f"({captions.max_length}) without stopping; check lm.stop",
            file=sys.stderr,
        )
    cider = ", ".join(f"{name} {block['cider']:.4f}" for name, block in by_protocol.items())
    return metrics, (
        f"score {spec.name}: {len(results)} test images, CIDEr {cider}, {unfinished} unfinished "
        f"-> {paths.metrics_path(config, spec.name)} ({time.perf_counter() - started:.1f} s)"
    )
