"""The captioning datasets viclip reads, each detected from the folder `data.root` names, or named by
`data.format` (docs/conventions.md, "Datasets", says where each format was looked up):

  ktvic     KTVIC, in either of its layouts: train and test
  uitviic   UIT-ViIC: uitviic_captions_{train,val,test}2017.json, its images in COCO's folders
  viecap4h  vieCap4H (VLSP 2021): train_captions.json, training only
  coco      COCO captions: a file a split (train, val, test in its name), or one file whose images name their split
  table     a CSV or JSON Lines table of image and caption (and split), in the folder or named by data.root

A split a dataset lacks is carved by image, seeded: test out of train (test_fraction), then validation out
of what train is left (val_fraction). Image ids are unique across a dataset's splits; a store holds one
dataset's images and says which (`dataset`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.errors import ViclipError
from pipeline.data.annotations import (
    TABLE_SUFFIXES, ImageFinder, ImageRecord, in_folder, read_coco, read_table, read_viecap4h,
)

SPLITS = ("train", "val", "test")

# KTVIC: layout name -> source split -> (annotation file, image folder), relative to the data root
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
ANNOTATION_FOLDERS = (".", "annotations")  # where COCO-format sets keep their files
UITVIIC_FILES = {split: f"uitviic_captions_{split}2017.json" for split in SPLITS}
SPLIT_WORD = re.compile(r"(?<![a-z])(train|val|valid|validation|dev|test)(?![a-z])")  # captions_val2017.json: val
SPLIT_NAMES = {"valid": "val", "validation": "val", "dev": "val"}


@dataclass(frozen=True)
class Format:
    name: str | None  # the dataset's name, where the format is one dataset's; None: the folder's name
    detect: Callable[[Path], Any]  # what under the root shows the format (its files), or None
    read: Callable[[Path, Any], dict[str, list[ImageRecord]]]  # the records of each split the files give


def _ktvic_files(root: Path) -> dict[str, tuple[Path, Path]] | None:
    for layout in LAYOUTS.values():
        files = {split: (root / ann, root / images) for split, (ann, images) in layout.items()}
        if all(ann.is_file() for ann, _ in files.values()):
            return files
    return None


def _read_ktvic(root: Path, files: dict[str, tuple[Path, Path]]) -> dict[str, list[ImageRecord]]:
    return {split: read_coco(ann, in_folder(images), "filename")["all"] for split, (ann, images) in files.items()}


def _uitviic_files(root: Path) -> dict[str, Path] | None:
    for folder in ANNOTATION_FOLDERS:
        files = {split: root / folder / name for split, name in UITVIIC_FILES.items()}
        if all(path.is_file() for path in files.values()):
            return files
    return None


def _read_coco_files(root: Path, files: dict[str, Path] | Path) -> dict[str, list[ImageRecord]]:
    find = ImageFinder(root)
    if isinstance(files, Path):  # one file, its images naming their splits, or all training images
        return _as_train(read_coco(files, find, splits=True))
    return {split: read_coco(path, find)["all"] for split, path in files.items()}


def _viecap4h_file(root: Path) -> Path | None:
    """train_captions.json holding a JSON list: a COCO set may name its training file so too, but as an object."""
    path = root / "train_captions.json"
    if not path.is_file():
        return None
    with path.open("rb") as file:
        return path if file.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[") else None


def _coco_files(root: Path) -> dict[str, Path] | Path | None:
    """A file a split, each named by its split (train required), or the one JSON file there is."""
    found = sorted(path for folder in ANNOTATION_FOLDERS for path in (root / folder).glob("*.json") if path.is_file())
    # COCO's own annotations folder holds instances_ and person_keypoints_ files beside the captions_ ones.
    found = [path for path in found if "caption" in path.name.lower()] or found
    by_split: dict[str, list[Path]] = {}
    for path in found:
        splits = {SPLIT_NAMES.get(word, word) for word in SPLIT_WORD.findall(path.stem.lower())}
        if len(splits) == 1:
            by_split.setdefault(splits.pop(), []).append(path)
    for split, paths in by_split.items():
        if len(paths) > 1:
            raise ViclipError(f"{root}: {len(paths)} {split} annotation files ({', '.join(p.name for p in paths)}); "
                              "keep one")
    if "train" in by_split:
        return {split: paths[0] for split, paths in by_split.items()}
    return found[0] if len(found) == 1 and not by_split else None


def _table_file(root: Path) -> Path | None:
    if root.is_file():
        return root if root.suffix.lower() in TABLE_SUFFIXES else None
    tables = sorted(path for path in root.iterdir() if path.suffix.lower() in TABLE_SUFFIXES and path.is_file())
    if len(tables) > 1:
        raise ViclipError(f"{root}: {len(tables)} tables ({', '.join(p.name for p in tables)}); "
                          "set data.root to the one to read")
    return tables[0] if tables else None


def _as_train(records: dict[str, list[ImageRecord]]) -> dict[str, list[ImageRecord]]:
    """A file's records under their splits, those of a file that names none as training images."""
    return {"train": records["all"]} if "all" in records else records


def _read_table(root: Path, table: Path) -> dict[str, list[ImageRecord]]:
    return _as_train(read_table(table, ImageFinder(table.parent)))


FORMATS: dict[str, Format] = {
    "ktvic": Format("KTVIC", _ktvic_files, _read_ktvic),
    "uitviic": Format("UIT-ViIC", _uitviic_files, _read_coco_files),
    "viecap4h": Format("vieCap4H", _viecap4h_file,
                       lambda root, path: {"train": read_viecap4h(path, ImageFinder(root))}),
    "coco": Format(None, _coco_files, _read_coco_files),
    "table": Format(None, _table_file, _read_table),
}
# Detected in this order: a named dataset's exact files first, the generic formats' looser signs after.
NAMED = ("ktvic", "uitviic", "viecap4h")
EXPECTED = ("KTVIC's train_data.json + test_data.json (or annotations/train_caption.json + test_caption.json), "
            "UIT-ViIC's uitviic_captions_{train,val,test}2017.json, vieCap4H's train_captions.json, "
            "COCO captions files or one CSV / JSON Lines table")


@dataclass(frozen=True)
class Dataset:
    name: str  # KTVIC, UIT-ViIC, vieCap4H; a COCO-format set's or a table's folder name
    format: str  # a FORMATS key
    splits: dict[str, list[ImageRecord]]  # train, val, test
    made: str  # how the splits came about: the dataset's own, or carved (which, how much, the seed)

    def attrs(self) -> dict[str, str]:
        """What a feature store of this dataset records, and readers check."""
        return {"dataset": self.name}


def _detect(root: Path, named: str | None) -> tuple[str, Any]:
    """The format of the dataset at `root` (`named`, where data.format names one), and its files."""
    if not root.exists():
        raise ViclipError(f"{root}: data root not found (set data.root in params.yaml)")
    if named is not None or root.is_file():
        name = named or "table"
        if root.is_file() and name != "table":
            raise ViclipError(f"{root}: a file, but data.format {name} reads a folder")
        files = FORMATS[name].detect(root)
        if files is None and root.is_file():
            raise ViclipError(f"{root}: not a table (a .csv or .jsonl file), nor a folder")
        if files is None:
            raise ViclipError(f"{root}: not a {name} dataset (data.format); expected {EXPECTED}")
        return name, files
    for name in NAMED:
        if (files := FORMATS[name].detect(root)) is not None:
            return name, files
    if partly := _partly(root):  # not read as a generic format: that would silently drop its official splits
        raise ViclipError(f"{root}: {partly}; or set data.format to read it as another format")
    found = {name: files for name in ("coco", "table") if (files := FORMATS[name].detect(root)) is not None}
    if len(found) > 1:
        raise ViclipError(f"{root}: both COCO captions files and a table; set data.format to coco or table")
    if not found:
        raise ViclipError(f"{root}: no dataset found (expected {EXPECTED})")
    return next(iter(found.items()))


def _partly(root: Path) -> str | None:
    """What is missing where some of a named dataset's files are there and others are not."""
    layouts = {"KTVIC": [[ann for ann, _ in layout.values()] for layout in LAYOUTS.values()],
               "UIT-ViIC": [[f"{folder}/{name}".removeprefix("./") for name in UITVIIC_FILES.values()]
                            for folder in ANNOTATION_FOLDERS]}
    for name, file_sets in layouts.items():
        for files in file_sets:
            there = [file for file in files if (root / file).is_file()]
            if there:
                missing = [file for file in files if file not in there]
                return f"not a {name} folder: {', '.join(missing)} missing (beside {', '.join(there)})"
    return None


def read_source(root: str | Path, format: str | None = None) -> Dataset:
    """The dataset under `root` as its files give it: the splits it has, nothing carved."""
    root = Path(root)
    name, files = _detect(root, format)
    splits = FORMATS[name].read(root, files)
    # A table named by data.root is known by its folder and file: two tables of one folder are two datasets.
    folder = f"{root.absolute().parent.name}/{root.name}" if root.is_file() else root.absolute().name
    return Dataset(FORMATS[name].name or folder, name, splits, "")


def carved_ids(image_ids: list[int], fraction: float, seed: int) -> set[int]:
    """The images held out: a seeded draw of `fraction` of them (at least one) over sorted ids."""
    ordered = np.array(sorted(image_ids))
    count = max(1, round(len(ordered) * fraction))
    chosen = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return set(ordered[chosen].tolist())


def _check_disjoint(splits: dict[str, list[ImageRecord]], root: str) -> None:
    """No image id, and no image file, in two splits: ids name a dataset's images, and a test image that is
    also trained on scores what was learnt by heart."""
    ids: dict[int, str] = {}
    files: dict[Path, str] = {}
    for split, records in splits.items():
        for record in records:
            if ids.setdefault(record.image_id, split) != split:
                raise ViclipError(f"{root}: image id {record.image_id} is in both {ids[record.image_id]} and "
                                  f"{split}; ids must be unique across a dataset's splits")
            if record.problem is None and files.setdefault(record.path, split) != split:
                raise ViclipError(f"{root}: {record.path} is in both {files[record.path]} and {split} "
                                  f"(image id {record.image_id} in {split})")


def load_dataset(config: DataConfig) -> Dataset:
    """The dataset `config` names, with train, val and test: any split it lacks carved out of train by image."""
    source = read_source(config.root, config.format)
    splits, made = {split: list(source.splits.get(split, [])) for split in SPLITS}, []
    _check_disjoint(source.splits, config.root)
    for split, fraction in (("test", config.test_fraction), ("val", config.val_fraction)):
        if split not in source.splits:
            held = carved_ids([r.image_id for r in splits["train"]], fraction, config.seed)
            splits[split] = [r for r in splits["train"] if r.image_id in held]
            splits["train"] = [r for r in splits["train"] if r.image_id not in held]
            made.append(f"{split} carved out of train by image ({fraction:g} of its images, seed {config.seed})")
    for split, records in splits.items():
        if not records:
            raise ViclipError(f"{config.root}: no {split} images ({source.name} has "
                              f"{sum(len(r) for r in source.splits.values())} in all)")
    return Dataset(source.name, source.format, splits, "; ".join(made) if made else "the dataset's own")


def load_splits(config: DataConfig) -> dict[str, list[ImageRecord]]:
    """train / val / test records of the dataset `config` names."""
    return load_dataset(config).splits
