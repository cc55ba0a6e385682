"""Caption files, read into image records: COCO-like JSON (KTVIC's, UIT-ViIC's, any COCO captions file),
vieCap4H's challenge JSON, and plain tables (CSV or JSON Lines). `pipeline.data.datasets` says which files
a dataset's folder holds and which reader each takes (docs/conventions.md, "Datasets").

Captions are normalised here, once, so every later stage sees the same text. Every reader fails in one
line naming the file and the entry or line at fault.
"""

from __future__ import annotations

import csv
import json
import os
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ViclipError

# A caption file's image names, resolved to files: (path, None), or (the name under the root, why not).
Resolve = Callable[[str], tuple[Path, str | None]]
TABLE_SUFFIXES = (".csv", ".jsonl")
TABLE_COLUMNS = ("image", "caption")  # and an optional "split"


@dataclass(frozen=True)
class ImageRecord:
    image_id: int  # unique within its dataset, across its splits
    path: Path
    captions: tuple[str, ...]
    problem: str | None = None  # why `path` cannot be used (its name found nowhere, or twice); None: it can


def caption_text(text: str) -> str:
    """A caption as every stage reads it and the LM learns it: NFC (Vietnamese arrives in NFC or NFD form),
    lowercase, single spaces, punctuation kept, since the LM learns where a sentence ends.

    Not the scoring protocol's text (`pipeline.evaluation.text.protocol_text`), which drops punctuation: the two
    differ on purpose, and merging them would change either what the LM learns or how captions are scored."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


class ImageFinder:
    """Image files found by name anywhere under a dataset's folder (links followed), for the formats whose
    files name images without their folder: UIT-ViIC's images stay in COCO's `train2017/` and `val2017/`."""

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        """Every file under the root by its name in lower case, each reached once: a folder linked twice (COCO's
        folder, and its train2017/ too) is walked once, and a link back up (a loop) not again."""
        if self._by_name is None:
            self._by_name, seen = defaultdict(list), set()
            for folder, folders, names in os.walk(self.root, followlinks=True):
                if os.path.realpath(folder) in seen:
                    folders.clear()
                    continue
                seen.add(os.path.realpath(folder))
                for name in names:
                    self._by_name[name.lower()].append(Path(folder) / name)
        return self._by_name

    def __call__(self, name: str) -> tuple[Path, str | None]:
        """The file `name` names: a path with folders, relative to the root, where it exists; otherwise the one
        file under the root whose path ends as `name` does, or failing that ends so but for letter case (a
        file list written on Windows: `a.jpg` for `A.JPG`). Where there is none, or more than one, the reason
        instead."""
        given = Path(name.replace("\\", "/"))  # a path written on Windows
        if len(given.parts) > 1 and (self.root / given).is_file():
            return self.root / given, None
        candidates = self._index().get(given.name.lower(), [])
        found = sorted(path for path in candidates if path.parts[-len(given.parts):] == given.parts) or sorted(
            path for path in candidates if [part.lower() for part in path.parts[-len(given.parts):]]
            == [part.lower() for part in given.parts])
        if len(found) == 1:
            return found[0], None
        if not found:
            return self.root / given, f"not found under {self.root}"
        where = ", ".join(str(path.relative_to(self.root)) for path in found[:3])
        return self.root / given, f"found {len(found)} times under {self.root} ({where})"


def in_folder(folder: Path) -> Resolve:
    """Image names resolved in one folder, as KTVIC's files name theirs."""
    return lambda name: (folder / name, None)


def _field(entry: object, key: str, kind: type, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise ViclipError(f"{where}: missing key '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ViclipError(f"{where}: '{key}' should be {kind.__name__}, got {value!r}")
    return value


def _caption(text: str, where: str) -> str:
    caption = caption_text(text)
    if not caption:
        raise ViclipError(f"{where}: empty caption")
    return caption


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ViclipError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise ViclipError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ViclipError(f"{path}: nested too deeply to be an annotation file") from None
    except OSError as error:
        raise ViclipError(f"{path}: unreadable ({error.strerror or error})") from None


def _record(image_id: int, resolved: tuple[Path, str | None], captions: list[str]) -> ImageRecord:
    path, problem = resolved
    return ImageRecord(image_id, path, tuple(captions), problem)


def read_coco(path: Path, resolve: Resolve, file_key: str = "file_name",
              splits: bool = False) -> dict[str, list[ImageRecord]]:
    """A COCO-like captions file: `images` (`id`, and the file name under `file_key`: COCO's `file_name`,
    KTVIC's `filename`) and `annotations` (`image_id`, `caption`). Its images in the file's order, under the
    split each one's `split` field names where `splits` and any image has one (Karpathy's `restval` is
    training data), else under "all"."""
    raw = _json(path)
    for key in ("images", "annotations"):
        if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
            raise ViclipError(f"{path}: missing key '{key}' (a list)")
    if not raw["images"]:
        raise ViclipError(f"{path}: no images")
    splits = splits and any(isinstance(image, dict) and "split" in image for image in raw["images"])

    images: dict[int, tuple[str, str]] = {}  # id -> (file name, split)
    for n, image in enumerate(raw["images"]):
        where = f"{path}: images[{n}]"
        image_id = _field(image, "id", int, where)
        if image_id in images:
            raise ViclipError(f"{where}: duplicate image id {image_id}")
        if not -2**63 <= image_id < 2**63:  # stores hold ids as int64
            raise ViclipError(f"{where}: image id {image_id} out of range")
        split = _field(image, "split", str, where) if splits else "all"
        if split not in ("all", "train", "val", "test", "restval"):
            raise ViclipError(f"{where}: 'split' should be train, val, test or restval, got {split!r}")
        images[image_id] = (_field(image, file_key, str, where), "train" if split == "restval" else split)

    captions: dict[int, list[str]] = {image_id: [] for image_id in images}
    for n, annotation in enumerate(raw["annotations"]):
        where = f"{path}: annotations[{n}]"
        image_id = _field(annotation, "image_id", int, where)
        if image_id not in captions:
            raise ViclipError(f"{where}: caption points at unknown image id {image_id}")
        captions[image_id].append(_caption(_field(annotation, "caption", str, where), where))

    records: dict[str, list[ImageRecord]] = defaultdict(list)
    for image_id, (name, split) in images.items():
        if not captions[image_id]:
            raise ViclipError(f"{path}: image id {image_id} ({name}) has no captions")
        records[split].append(_record(image_id, resolve(name), captions[image_id]))
    return dict(records)


def read_viecap4h(path: Path, resolve: Resolve) -> list[ImageRecord]:
    """vieCap4H's challenge JSON: a list of {"id": the image's file name, "captions": its captions, one a line}.
    Image ids are given by file name order, so they do not depend on the file's order."""
    raw = _json(path)
    if not isinstance(raw, list) or not raw:
        raise ViclipError(f"{path}: expected a JSON list of {{\"id\", \"captions\"}}, one an image")
    captions: dict[str, list[str]] = {}
    for n, entry in enumerate(raw):
        where = f"{path}: [{n}]"
        name = _field(entry, "id", str, where)
        if name in captions:
            raise ViclipError(f"{where}: image {name} listed twice")
        lines = [caption_text(line) for line in _field(entry, "captions", str, where).splitlines()]
        captions[name] = [line for line in lines if line]
        if not captions[name]:
            raise ViclipError(f"{where}: empty caption")
    return _numbered(captions, resolve)["all"]


def _numbered(captions: dict[str, list[str]], resolve: Resolve,
              splits: dict[str, str] | None = None) -> dict[str, list[ImageRecord]]:
    """Records of images known by name alone, numbered in name order, under their split ("all" without)."""
    records: dict[str, list[ImageRecord]] = defaultdict(list)
    for image_id, name in enumerate(sorted(captions)):
        split = splits[name] if splits else "all"
        records[split].append(_record(image_id, resolve(name), captions[name]))
    return dict(records)


def _same_files(captions: dict[str, list[str]], splits: dict[str, str], resolve: Resolve,
                path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Rows that name one file two ways (`pics/a.jpg`, `a.jpg`) merged under its first name."""
    first: dict[Path, str] = {}
    merged: dict[str, list[str]] = {}
    for name, texts in captions.items():
        found, problem = resolve(name)
        key = first.setdefault(found, name) if problem is None else name
        if key != name and splits.get(key) != splits.get(name):
            raise ViclipError(f"{path}: {name} and {key} are one file, in {splits.get(name)} and {splits.get(key)}")
        merged.setdefault(key, []).extend(texts)
    return merged, {name: split for name, split in splits.items() if name in merged}


def _table_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a CSV (header first; a byte-order mark and CRLF line ends allowed) or
    JSON Lines table (blank lines skipped)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(file)
                header = reader.fieldnames or []
                for column in TABLE_COLUMNS:
                    if column not in header:
                        raise ViclipError(f"{path}: no '{column}' column in its header ({', '.join(header)})")
                for row in reader:
                    # A short row's missing cells are None, a long row's extra ones under None: both dropped.
                    yield f"{path}: line {reader.line_num}", {k: v for k, v in row.items() if None not in (k, v)}
                return
            for number, line in enumerate(file, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, RecursionError) as error:
                        raise ViclipError(f"{path}: line {number}: not valid JSON ({error})") from None
                    if not isinstance(row, dict):
                        raise ViclipError(f"{path}: line {number}: not a JSON object")
                    yield f"{path}: line {number}", row
    except UnicodeDecodeError:
        raise ViclipError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise ViclipError(f"{path}: unreadable ({error.strerror or error})") from None
    except csv.Error as error:
        raise ViclipError(f"{path}: not a readable CSV table ({error})") from None


def read_table(path: Path, resolve: Resolve) -> dict[str, list[ImageRecord]]:
    """A plain table, one caption a row: `image` (a path under the dataset's folder, or a file name found
    there), `caption`, and an optional `split` (train, val or test; an image's rows agree). Images are
    numbered in name order; without a split column every image is under "all"."""
    captions: dict[str, list[str]] = defaultdict(list)
    splits: dict[str, str] = {}
    first_line: dict[str, str] = {}
    for where, row in _table_rows(path):
        image, caption = (_field(row, column, str, where) for column in TABLE_COLUMNS)
        if not image.strip():
            raise ViclipError(f"{where}: empty 'image'")
        captions[image].append(_caption(caption, where))
        first_line.setdefault(image, where)
        if row.get("split") not in (None, ""):
            split = _field(row, "split", str, where)
            if split not in ("train", "val", "test"):
                raise ViclipError(f"{where}: 'split' should be train, val or test, got {split!r}")
            if splits.setdefault(image, split) != split:
                raise ViclipError(f"{where}: {image} is in {splits[image]} on an earlier line and in {split} here")
    if not captions:
        raise ViclipError(f"{path}: no rows")
    unsplit = [image for image in captions if image not in splits]
    if splits and unsplit:
        raise ViclipError(f"{first_line[unsplit[0]]}: {unsplit[0]} has no 'split' where other images have one")
    resolve = {image: resolve(image) for image in captions}.__getitem__  # each name looked up once
    captions, splits = _same_files(captions, splits, resolve, path)
    return _numbered(captions, resolve, splits or None)
