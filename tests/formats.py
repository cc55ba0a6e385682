"""Tiny dataset folders in each format viclip reads (UIT-ViIC, vieCap4H, COCO captions, tables), each with the
quirks its real files have, and a converter from the synthetic KTVIC folder to UIT-ViIC's layout.

A writer takes `Item`s and returns each image file it wrote, with its item, so a test can tell what reading
the folder should give: every caption's `BASE` text, whatever form (NFD, capitals) it was written in."""

from __future__ import annotations

import csv
import json
import os
import shutil
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as photos

from pipeline.data.datasets import read_source

SIZE = 64  # pixels a side: enough for a decoder, small enough to write hundreds of
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
# Captions as a reader should give them back: NFC, lowercase, one space, the final "." kept.
BASE = (
    "một phi hành gia mặc bộ đồ vũ trụ màu trắng.",
    "con mèo vằn đang nhìn thẳng vào máy ảnh.",
    "tách cà phê đặt trên đĩa sứ trắng.",
    "tên lửa đứng trên bệ phóng giữa trời xanh.",
    "chiếc xe máy đỗ trong phòng, bên cạnh là chiếc ghế.",
    "hai hình tròn màu đỏ ở bên trái",
    "người đàn ông đội mũ bảo hiểm đi trên đường phố.",
)


@dataclass(frozen=True)
class Item:
    """One image of a fixture: its id (what COCO-format files call it), its captions as written, the split
    its files put it in (train, val, test; restval in a one-file COCO set), and its pixels: a `PHOTOS` name,
    a seed for a drawn picture, or an image file to link."""

    image_id: int
    captions: tuple[str, ...]
    split: str = "train"
    pixels: str | int | Path = 0


def written(text: str, form: int) -> str:
    """`text` as a caption file may hold it: as is, in NFD, capitalised, or both with stray spaces."""
    if form % 2:
        text = unicodedata.normalize("NFD", text)
    if form % 4 >= 2:
        text = f"  {text[0].upper()}{text[1:].replace(' ', '  ', 1)} "
    return text


def items(splits: dict[str, int], first_id: int = 1, captions: int = 3) -> list[Item]:
    """`splits[split]` images of each split, their pixels alternating between photos and drawings; image `i`
    has `captions` captions (the second image one only), each `BASE` text turning up in every `written` form."""
    made = []
    for split, count in splits.items():
        for _ in range(count):
            i = len(made)
            n = 1 if i == 1 else captions
            texts = tuple(written(BASE[(i + k) % len(BASE)], i + k) for k in range(n))
            pixels = PHOTOS[i // 2 % len(PHOTOS)] if i % 2 == 0 else i
            made.append(Item(first_id + i, texts, split, pixels))
    return made


def expected(captions: tuple[str, ...]) -> tuple[str, ...]:
    """What a reader should make of captions `items` wrote (worked out without the reader's own code)."""
    return tuple(BASE[[written(base, form) for base in BASE for form in range(4)].index(c) // 4] for c in captions)


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    pixels = photos.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(photos, name)()
    image = Image.fromarray(pixels).convert("RGB")
    image.thumbnail((SIZE, SIZE))
    return image


def _drawing(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(200, 256, 3)))
    x, y = (int(v) for v in rng.integers(8, SIZE - 24, 2))
    ImageDraw.Draw(image).ellipse((x, y, x + 16, y + 16), fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
    return image


def save_image(item: Item, path: Path) -> Path:
    """The item's pixels at `path` (a linked or copied file where its pixels are a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(item.pixels, Path):
        try:
            os.link(item.pixels, path)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(item.pixels, path)
    else:
        image = _photo(item.pixels) if isinstance(item.pixels, str) else _drawing(item.pixels)
        image.save(path, quality=85)
    return path


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")


def coco_file(entries: list[tuple[Item, str]], split_field: bool = False) -> dict:
    """A captions file as COCO writes it, with the keys viclip does not read: (item, its `file_name`) each."""
    images, annotations = [], []
    for item, name in entries:
        images.append({
            "license": 1 + item.image_id % 6, "file_name": name,
            "coco_url": f"http://images.cocodataset.org/train2017/{Path(name).name}",
            "height": SIZE, "width": SIZE, "date_captured": "2013-11-14 16:28:13",
            "flickr_url": f"http://farm4.staticflickr.com/{item.image_id}.jpg", "id": item.image_id,
            **({"split": item.split} if split_field else {}),
        })
        annotations += [{"image_id": item.image_id, "id": 10 * item.image_id + k, "caption": caption}
                        for k, caption in enumerate(item.captions)]
    return {"info": {"description": "viclip test set", "year": 2017}, "licenses": [{"id": 1, "name": "CC"}],
            "images": images, "annotations": annotations}


def coco_name(item: Item) -> str:
    return f"{item.image_id:012d}.jpg"


def write_uitviic(root: Path, images: list[Item]) -> dict[Path, Item]:
    """UIT-ViIC: uitviic_captions_{train,val,test}2017.json at the root; its images are COCO's, in COCO's
    coco/train2017/ and coco/val2017/, each split's alternating between the two (UIT-ViIC drew from both)."""
    files = {}
    for split in ("train", "val", "test"):
        ours = [item for item in images if item.split == split]
        for n, item in enumerate(ours):
            files[save_image(item, root / "coco" / ("train2017", "val2017")[n % 2] / coco_name(item))] = item
        write_json(root / f"uitviic_captions_{split}2017.json", coco_file([(item, coco_name(item)) for item in ours]))
    return files


def write_viecap4h(root: Path, images: list[Item]) -> dict[Path, Item]:
    """vieCap4H: train_captions.json, a list of {"id": file name, "captions": captions one a line} (every
    other one ending in a newline), its images in images_train/."""
    files = {save_image(item, root / "images_train" / f"{item.image_id:04d}.jpg"): item for item in images}
    write_json(root / "train_captions.json", [
        {"id": path.name, "captions": "\n".join(item.captions) + "\n" * (n % 2)}
        for n, (path, item) in enumerate(files.items())
    ])
    return files


def write_coco(root: Path, images: list[Item], one_file: bool) -> dict[Path, Item]:
    """COCO captions: annotations/captions_{split}2017.json a split, images in {split}2017/; or, `one_file`,
    one Karpathy-style file whose images name their split (restval among them) and their folder."""
    files = {}
    if one_file:
        files = {save_image(item, root / "images" / coco_name(item)): item for item in images}
        write_json(root / "captions_karpathy.json",
                   coco_file([(item, f"images/{coco_name(item)}") for item in images], split_field=True))
        return files
    for split in sorted({item.split for item in images}):
        ours = [item for item in images if item.split == split]
        files.update({save_image(item, root / f"{split}2017" / coco_name(item)): item for item in ours})
        write_json(root / f"annotations/captions_{split}2017.json",
                   coco_file([(item, coco_name(item)) for item in ours]))
    return files


def table_name(item: Item) -> str:
    return f"photo_{item.image_id}.jpg"


def table_rows(images: list[Item], split_column: bool) -> list[dict[str, str]]:
    """One row a caption; even images named `pics/NAME`, odd ones `NAME`, and the first both ways."""
    rows = []
    for n, item in enumerate(images):
        for k, caption in enumerate(item.captions):
            folder = "pics/" if (n + (n == 0) * k) % 2 == 0 else ""
            rows.append({"image": folder + table_name(item), "caption": caption,
                         **({"split": item.split} if split_column else {})})
    return rows


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    """A table as spreadsheets and editors write them: a CSV with a byte-order mark and CRLF line ends,
    or JSON Lines with a blank line in it."""
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8-sig", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), lineterminator="\r\n")
            writer.writeheader()
            writer.writerows(rows)
    else:
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    return path


def write_table(root: Path, images: list[Item], kind: str = "csv", split_column: bool = True) -> dict[Path, Item]:
    """A table, captions.{csv,jsonl}, of image, caption (and split); every image in pics/."""
    files = {save_image(item, root / "pics" / table_name(item)): item for item in images}
    write_rows(root / f"captions.{kind}", table_rows(images, split_column))
    return files


def uitviic_from_ktvic(ktvic_root: Path, out_root: Path, val_images: int) -> Path:
    """A UIT-ViIC folder of the KTVIC folder's images and captions: the first `val_images` training images its
    val split, every split's images spread over coco/train2017/ and coco/val2017/, named by id as COCO's are."""
    splits = read_source(ktvic_root).splits
    records = [(record, "val" if n < val_images else "train") for n, record in enumerate(splits["train"])]
    records += [(record, "test") for record in splits["test"]]
    write_uitviic(Path(out_root), [Item(r.image_id, r.captions, split, r.path) for r, split in records])
    return Path(out_root)
