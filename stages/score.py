"""Stage 3: decode the test split with a trained model (any registered one) and score it under the stated protocols."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pipeline.core import distributed, paths, registry
from pipeline.core.config import Config
from pipeline.core.devices import best_device
from pipeline.core.io import write_json
from pipeline.data.datasets import load_dataset
from pipeline.data.features import open_store
from pipeline.decoding.beam import caption_features
from pipeline.evaluation.metrics import laid_out, score_captions
from pipeline.evaluation.protocols import chosen
from pipeline.evaluation.results import named, stored, test_references
from pipeline.models import load_model

UNFINISHED_WARNING = 0.05  # the share of captions cut at max_length that says the model does not stop


def run(config: Config, model_name: str = registry.DEFAULT_MODEL, model_dir: str | Path | None = None) -> tuple[dict, str]:
    """Decode the test split with a trained model and score it; `model_dir` overrides where it is read from.

    Under torchrun each rank decodes its share of whole batches, streamed from the store; the main rank
    gathers the captions, scores them once and writes; the others return ({}, "")."""
    started = time.perf_counter()
    model_dir = Path(model_dir or paths.model_dir(config, model_name))
    dataset = load_dataset(config.data)
    references = test_references(dataset)
    device = best_device()
    model, spec = load_model(model_dir, device)
    store = open_store(paths.store_path(config, "test", spec.store), {**spec.store_attrs, **dataset.attrs()})
    scored = stored(references, store)

    size = config.score.batch_size
    mine = distributed.shard(-(-len(store) // size))
    rows = range(mine.start * size, min(mine.stop * size, len(store)))
    batches = (torch.from_numpy(batch).to(device) for batch in store.slices(rows, size))
    captions = caption_features(model, batches, config.score, total=len(mine))
    shares = distributed.gather((captions.texts, captions.unfinished))
    if not distributed.is_main():
        return {}, ""
    texts, unfinished = [t for share, _ in shares for t in share], sum(n for _, n in shares)
    # The file name too: vieCap4H and tables know their images by name, and their ids are viclip's numbering.
    names = {r.image_id: r.path.name for r in dataset.splits["test"]}
    results = [{"image_id": int(i), "file_name": names[int(i)], "caption": c} for i, c in zip(store.image_ids, texts)]
    predictions = {r["image_id"]: r["caption"] for r in results}
    by_protocol = score_captions(scored, predictions, chosen(config.score.protocol), str(store.path))
    notes: dict[str, str] = {}
    if captions.clamped_from is not None:
        notes["max_length"] = (
            f"score.max_length {captions.clamped_from} capped at {captions.max_length}: "
            "the LM's context holds no more after the prefix (and the longest retrieval prompt)"
        )

    metrics = laid_out(by_protocol, model=spec.name, **named(dataset), split="test", images=len(scored),
                       unfinished=unfinished, max_length=captions.max_length, notes=notes)
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
        f"score {spec.name}: {len(results)} {dataset.name} test images, CIDEr {cider}, {unfinished} unfinished "
        f"-> {paths.metrics_path(config, spec.name)} ({time.perf_counter() - started:.1f} s)"
    )
