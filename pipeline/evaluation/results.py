"""The test split's references, and scoring a results file against them without decoding.

A results file is COCO's: a JSON list of {"image_id", "caption"}. `viclip score --captions FILE` scores
any system's file this way, and the demo scores its blind baseline so.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Config
from pipeline.core.errors import ViclipError
from pipeline.core.io import read_json
from pipeline.data.datasets import Dataset, load_dataset
from pipeline.data.features import FeatureStore, open_store
from pipeline.evaluation.metrics import laid_out, score_captions
from pipeline.evaluation.protocols import chosen


def test_references(dataset: Dataset) -> dict[int, list[str]]:
    """Each test image's references: as many as the dataset gives it (mostly one in vieCap4H, five in KTVIC)."""
    return {r.image_id: list(r.captions) for r in dataset.splits["test"]}


def named(dataset: Dataset) -> dict[str, str]:
    """The fields a metrics file names the dataset scored by, and how its splits came about."""
    return {"dataset": dataset.name, "splits": dataset.made}


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
    """The references of the images in `store`: those `viclip score` decodes (extraction may skip some).
    Refused, before anything is decoded, where the store holds images the split does not (a test split
    carved with another seed, say)."""
    ids = set(store.image_ids.tolist())
    if unknown := sorted(ids - set(references)):
        raise ViclipError(f"{store.path}: {len(unknown)} images not in the test split (e.g. id {unknown[0]}); "
                          "re-run `viclip extract`")
    return {i: refs for i, refs in references.items() if i in ids}


def score_file(config: Config, captions_file: str | Path, protocol: str | None = None) -> dict:
    """Score an existing results file against the test references, without decoding, under `protocol`
    (default: score.protocol).

    Where a CLIP store of the test split exists, only its images are scored (the set `viclip score`
    decodes): captions of images that extraction skipped as unreadable are dropped and counted."""
    dataset = load_dataset(config.data)
    references = test_references(dataset)
    predictions = read_results(captions_file)
    dropped: list[int] = []
    store = paths.store_path(config, "test")
    if store.is_file():
        scored = stored(references, open_store(store, dataset.attrs()))
        dropped = [i for i in predictions if i in references and i not in scored]
        references = scored
        predictions = {i: c for i, c in predictions.items() if i not in dropped}
    by_protocol = score_captions(references, predictions, chosen(protocol or config.score.protocol),
                                 str(captions_file))
    return laid_out(by_protocol, model=Path(captions_file).name, **named(dataset), split="test",
                    images=len(references), dropped=len(dropped))
