"""A synthetic dataset in KTVIC's layout, for the offline demo and the tests.

Each image shows one to three shapes of one colour on one side of a light
background; its five Vietnamese captions say how many, which shape, which
colour and where, in varied templates. Some captions are written in Unicode
NFD form and with capitals, as real Vietnamese text sometimes arrives.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.datasets import LAYOUTS, read_source

SHAPES = {"circle": "hình tròn", "square": "hình vuông", "triangle": "hình tam giác"}
COLOURS = {"đỏ": (220, 40, 40), "xanh lá": (40, 170, 60), "xanh dương": (40, 80, 220), "vàng": (235, 200, 30)}
COUNTS = {1: "một", 2: "hai", 3: "ba"}
SIDES = {"left": "bên trái", "right": "bên phải"}
TEMPLATES = (
    "có {count} {shape} màu {colour} ở {side}",
    "{count} {shape} màu {colour} nằm ở {side} của bức ảnh",
    "bức ảnh có {count} {shape} màu {colour}",
    "hình ảnh gồm {count} {shape} {colour} ở {side}",
    "{count} {shape} màu {colour} trên nền sáng",
)
WORDS = ("hình tròn", "hình vuông", "hình tam giác", "xanh lá", "xanh dương", "bên trái", "bên phải", "bức ảnh", "hình ảnh")


def _draw(rng: np.random.Generator, shape: str, colour: tuple[int, int, int], count: int, side: str, size: int) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size // 9
    x_low, x_high = (radius, size // 2 - radius) if side == "left" else (size // 2 + radius, size - radius)
    slots = np.linspace(radius + 2, size - radius - 2, 3)  # one row per shape, so they never overlap
    for y in rng.permutation(slots)[:count]:
        x = rng.integers(x_low, x_high + 1)
        box = (x - radius, y - radius, x + radius, y + radius)
        tint = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
        if shape == "circle":
            draw.ellipse(box, fill=tint)
        elif shape == "square":
            draw.rectangle(box, fill=tint)
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=tint)
    return image


def _segment(caption: str) -> str:
    for word in WORDS:
        caption = caption.replace(word, word.replace(" ", "_"))
    return caption


def _captions(rng: np.random.Generator, shape: str, colour: str, count: int, side: str) -> list[str]:
    captions = []
    for template in TEMPLATES:
        text = template.format(count=COUNTS[count], shape=SHAPES[shape], colour=colour, side=SIDES[side])
        if rng.random() < 0.2:
            text = unicodedata.normalize("NFD", text)
        if rng.random() < 0.2:
            text = text[0].upper() + text[1:]
        captions.append(text)
    return captions


def write_split(
    annotation_file: Path, image_dir: Path, images: int, first_id: int, rng: np.random.Generator, size: int
) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for image_id in range(first_id, first_id + images):
        shape = str(rng.choice(list(SHAPES)))
        colour = str(rng.choice(list(COLOURS)))
        count = int(rng.integers(1, 4))
        side = str(rng.choice(list(SIDES)))
        filename = f"{image_id:06d}.jpg"
        _draw(rng, shape, COLOURS[colour], count, side, size).save(image_dir / filename, quality=90)
        entries.append({"id": image_id, "filename": filename})
        for caption in _captions(rng, shape, colour, count, side):
            annotations.append({
                "id": len(annotations) + first_id * 10, "image_id": image_id,
                "caption": caption, "segment_caption": _segment(caption),
            })
    annotation_file.write_text(
        json.dumps({"images": entries, "annotations": annotations}, ensure_ascii=False, indent=1),
        encoding="utf-8",
    )


def make_dataset(
    root: str | Path, train_images: int, test_images: int, layout: str = "original",
    seed: int = 0, size: int = 96,
) -> Path:
    """Write a KTVIC-layout folder at `root`; returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": (train_images, 1), "test": (test_images, 100_000)}
    for split, (annotation, image_dir) in LAYOUTS[layout].items():
        images, first_id = counts[split]
        write_split(root / annotation, root / image_dir, images, first_id, rng, size)
    return root


def caption_groups(root: str | Path) -> list[list[str]]:
    """Each training image's normalised captions, to train a tokenizer and pre-train a tiny LM on."""
    return [list(r.captions) for r in read_source(root).splits["train"]]
