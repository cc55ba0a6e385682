"""Reading KTVIC in both layouts; the validation split; the tokenizer conventions."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch

from pipeline.core.config import DataConfig
from pipeline.data.datasets import load_splits
from pipeline.demo.synthetic import make_dataset
from pipeline.demo.tiny import make_tiny_lm
from pipeline.models.viclipcap.lm import load_lm


@pytest.mark.parametrize("layout", ["original", "repackaged"])
def test_both_layouts_read_the_same(tmp_path, layout):
    make_dataset(tmp_path / "same", 30, 6, layout="original")
    make_dataset(tmp_path / layout, 30, 6, layout=layout)
    read = {
        name: load_splits(DataConfig(root=str(tmp_path / name), val_fraction=0.2, seed=3))
        for name in ("same", layout)
    }
    for split in ("train", "val", "test"):
        assert [(r.image_id, r.captions) for r in read["same"][split]] == \
               [(r.image_id, r.captions) for r in read[layout][split]]
        assert all(r.path.is_file() for r in read[layout][split])


def test_captions_are_nfc_lowercase_and_val_is_carved_by_image(tmp_path):
    root = make_dataset(tmp_path / "ktvic", 40, 5)
    raw = json.loads((root / "train_data.json").read_text(encoding="utf-8"))
    assert any(a["caption"] != unicodedata.normalize("NFC", a["caption"]) for a in raw["annotations"])
    splits = load_splits(DataConfig(root=str(root), val_fraction=0.25, seed=0))
    captions = [c for records in splits.values() for r in records for c in r.captions]
    assert all(c == unicodedata.normalize("NFC", c).lower() for c in captions)
    train_ids = {r.image_id for r in splits["train"]}
    val_ids = {r.image_id for r in splits["val"]}
    assert len(val_ids) == 10 and not train_ids & val_ids and len(train_ids | val_ids) == 40
    again = load_splits(DataConfig(root=str(root), val_fraction=0.25, seed=0))
    assert {r.image_id for r in again["val"]} == val_ids
    other = load_splits(DataConfig(root=str(root), val_fraction=0.25, seed=1))
    assert {r.image_id for r in other["val"]} != val_ids


@pytest.mark.parametrize("convention, eos", [("gpt2news", "</s>"), ("nlphust", "<|endoftext|>")])
def test_both_tokenizer_conventions_load(tmp_path, convention, eos):
    groups = [["có một hình tròn màu đỏ", "một hình tròn đỏ"], ["hai hình vuông màu vàng", "hình vuông vàng"]] * 5
    directory = make_tiny_lm(groups, tmp_path / convention, convention=convention, steps=1)
    if convention == "gpt2news":
        # gpt2news ships tokenizer.json only: no word from the tokenizer on which token ends a text.
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)
    lm = load_lm(str(directory), None, torch.device("cpu"))
    assert lm.tokenizer.convert_ids_to_tokens(lm.stop_id) == eos
    if convention == "nlphust":
        assert lm.tokenizer.pad_token is None
    else:
        assert lm.tokenizer.convert_tokens_to_ids("<pad>") != 0 or lm.stop_id != 0
    encoded = lm.encode(["có một hình tròn màu đỏ"])[0]
    assert encoded[-1] == lm.stop_id
    assert lm.decode(encoded) == "có một hình tròn màu đỏ"

    dot = load_lm(str(directory), ".", torch.device("cpu"))  # the stop text needs no end-of-text token
    assert dot.tokenizer.convert_ids_to_tokens(dot.stop_id) == "." and lm.stop_id in dot.banned_ids
    assert dot.decode(dot.encode(["có một hình tròn màu đỏ"])[0]) == "có một hình tròn màu đỏ"
