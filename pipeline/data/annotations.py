"""KTVIC (and any COCO-like Vietnamese caption set in its layout): images and their captions.

Two layouts are in circulation (docs/conventions.md, "KTVIC layouts"); both are
read. Captions are normalised to Unicode NFC and lowercase here, once, so every
later stage sees the same text. A validation split is carved out of train by
image, never by caption, with a fixed seed.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.errors import ViclipError

SPLITS = ("train", "val", "test")

# layout name -> source split -> (annotation file, image folder), relative to the data root
LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "original": {
        "train": ("train_data.json", "train-images"),
        "test": ("test_data.json", "public-test-images"),
    },
    "repackaged": {
        "train": ("annotations/train_caption.json", "images/train"),
        "test": ("annotations/test_caption.json", "images/test"),
    },
}


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...]


def caption_text(text: str) -> str:
    """A caption as every stage reads it and the LM learns it: NFC (Vietnamese arrives in NFC or NFD form),
    lowercase, single spaces, punctuation kept, since the LM learns where a sentence ends.

    Not the scoring protocol's text (`pipeline.evaluation.text.protocol_text`), which drops punctuation: the two
    differ on purpose, and merging them would change either what the LM learns or how captions are scored."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def find_layout(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """The (annotation file, image folder) of each source split under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise ViclipError(f"{root}: data root not found (set data.root in params.yaml)")
    for layout in LAYOUTS.values():
        files = {split: (root / ann, root / images) for split, (ann, images) in layout.items()}
        if all(ann.is_file() for ann, _ in files.values()):
            return files
    expected = " or ".join(
        "+".join(ann for ann, _ in layout.values()) for layout in LAYOUTS.values()
    )
    raise ViclipError(f"{root}: not a KTVIC folder (expected {expected})")


def _field(entry: object, key: str, kind: type, where: str) -> object:
    if not isinstance(entry, dict) or key not in entry:
        raise ViclipError(f"{where}: missing key '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ViclipError(f"{where}: '{key}' should be {kind.__name__}, got {value!r}")
    return value


def read_annotations(annotation_file: Path, image_dir: Path) -> list[ImageRecord]:
    """Every image of one annotation file with its captions, in the file's order."""
    try:
        raw = json.loads(annotation_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ViclipError(f"{annotation_file}: not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise ViclipError(f"{annotation_file}: not UTF-8 text") from None
    for key in ("images", "annotations"):
        if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
            raise ViclipError(f"{annotation_file}: missing key '{key}' (a list)")

    filenames: dict[int, str] = {}
    for n, image in enumerate(raw["images"]):
        where = f"{annotation_file}: images[{n}]"
        image_id = _field(image, "id", int, where)
        if image_id in filenames:
            raise ViclipError(f"{where}: duplicate image id {image_id}")
        filenames[image_id] = _field(image, "filename", str, where)

    captions: dict[int, list[str]] = {image_id: [] for image_id in filenames}
    for n, annotation in enumerate(raw["annotations"]):
        where = f"{annotation_file}: annotations[{n}]"
        image_id = _field(annotation, "image_id", int, where)
        caption = caption_text(_field(annotation, "caption", str, where))
        if image_id not in captions:
            raise ViclipError(f"{where}: caption points at unknown image id {image_id}")
        if not caption:
            raise ViclipError(f"{where}: empty caption for image id {image_id}")
        captions[image_id].append(caption)

    for image_id, texts in captions.items():
        if not texts:
            raise ViclipError(
                f"{annotation_file}: image id {image_id} ({filenames[image_id]}) has no captions"
            )
    return [
        ImageRecord(image_id, image_dir / filenames[image_id], tuple(captions[image_id]))
        for image_id in filenames
    ]


def validation_ids(image_ids: list[int], fraction: float, seed: int) -> set[int]:
    """The train images held out for validation: a seeded draw over sorted ids."""
    ordered = np.array(sorted(image_ids))
    count = max(1, round(len(ordered) * fraction))
    chosen = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return set(ordered[chosen].tolist())


def load_splits(config: DataConfig) -> dict[str, list[ImageRecord]]:
    """train / val / test records; val is carved out of the source train split."""
    files = find_layout(config.root)
    train = read_annotations(*files["train"])
    test = read_annotations(*files["test"])
    held_out = validation_ids([r.image_id for r in train], config.val_fraction, config.seed)
    return {
        "train": [r for r in train if r.image_id not in held_out],
        "val": [r for r in train if r.image_id in held_out],
        "test": test,
    }
