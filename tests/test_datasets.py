"""Every dataset format read from a folder alone: UIT-ViIC, vieCap4H, COCO captions and tables (tests/formats.py
writes them); the splits a dataset lacks carved by image; `data.format` and the ambiguous folders; each bad
input one clear line; image names found nowhere or twice, read, extracted and skipped."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.config import DataConfig
from pipeline.core.errors import ViclipError
from pipeline.data.datasets import load_dataset, read_source
from pipeline.data.features import FeatureStore, open_store, write_store
from pipeline.demo import dvc, dvc_project
from pipeline.demo.synthetic import make_dataset
from pipeline.evaluation.results import stored
from tests.conftest import make_project
from tests.formats import (
    Item, coco_name, expected, items, table_name, uitviic_from_ktvic, write_coco, write_rows, write_table,
    write_uitviic, write_viecap4h,
)
from tests.test_cli import assert_clear_error, edit_params, invoke

OWN = {"train": 4, "val": 2, "test": 3}  # the items of a dataset with its own splits
UNSPLIT = {"train": 12}
CARVED = {"train": 8, "val": 3, "test": 1}  # UNSPLIT read with `config`'s fractions
# A format's folder: (writer, its items' splits, format, dataset name; None: the folder's name)
WRITERS = {
    "uitviic": (write_uitviic, OWN, "uitviic", "UIT-ViIC"),
    "viecap4h": (write_viecap4h, UNSPLIT, "viecap4h", "vieCap4H"),
    "coco_files": (partial(write_coco, one_file=False), OWN, "coco", None),
    "coco_one_file": (partial(write_coco, one_file=True), {"train": 2, "restval": 2, "val": 2, "test": 3}, "coco",
                      None),
    **{f"{kind}{suffix}": (partial(write_table, kind=kind, split_column=not suffix), UNSPLIT if suffix else OWN,
                           "table", None)
       for kind in ("csv", "jsonl") for suffix in ("", "_unsplit")},
}


def config(root: Path, **changes) -> DataConfig:
    return DataConfig(**{"root": str(root), "val_fraction": 0.25, "seed": 0, **changes})


def assert_raises(read, root: Path, *fragments: str) -> str:
    """`read` fails in one line naming the root (and in it the file) and each fragment."""
    with pytest.raises(ViclipError) as error:
        read()
    message = str(error.value)
    assert "\n" not in message and str(root) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def build(tmp_path: Path, key: str) -> tuple[Path, dict[Path, Item]]:
    """A `key` folder, `my_set`, and the image files it holds with their items."""
    write, splits, *_ = WRITERS[key]
    root = tmp_path / "my_set"
    return root, write(root, items(splits))


def own_split(item: Item) -> str:
    return {"restval": "train"}.get(item.split, item.split)


@pytest.mark.parametrize("key, table", [(key, None) for key in WRITERS] + [("csv", "captions.csv"),
                                                                           ("jsonl_unsplit", "captions.jsonl")])
def test_each_format_is_detected_and_read(tmp_path, key, table):
    root, files = build(tmp_path, key)
    _, splits, format, name = WRITERS[key]
    dataset = load_dataset(config(root / table if table else root))
    assert (dataset.format, dataset.name) == (format, name or (f"my_set/{table}" if table else "my_set"))
    own = {own_split(item) for item in files.values()} == {"train", "val", "test"}
    sizes = {split: sum(own_split(item) == split for item in files.values()) for split in ("train", "val", "test")}
    assert {split: len(records) for split, records in dataset.splits.items()} == (sizes if own else CARVED)

    records = [(split, record) for split, rs in dataset.splits.items() for record in rs]
    assert len({record.image_id for _, record in records}) == len(records) == len(files)
    assert {record.path for _, record in records} == set(files)  # an image named two ways is one image
    for split, record in records:
        item = files[record.path]
        assert record.problem is None and (split == own_split(item) or not own)
        # The same text whatever form it was written in: NFC or NFD, capitalised, spaced.
        assert sorted(record.captions) == sorted(expected(item.captions))
    captions = [caption for _, record in records for caption in record.captions]
    assert all(c == unicodedata.normalize("NFC", c).lower() for c in captions) and captions[0].endswith(".")
    assert any(not unicodedata.is_normalized("NFC", c) for item in files.values() for c in item.captions)


def test_uitviic_keeps_its_own_val_and_finds_images_in_both_coco_folders(tmp_path):
    root, _ = build(tmp_path, "uitviic")
    dataset = load_dataset(config(root))
    assert dataset.made == "the dataset's own"
    for records in dataset.splits.values():
        assert {record.path.parent.name for record in records} == {"train2017", "val2017"}


@pytest.mark.parametrize("key", ["viecap4h", "csv_unsplit"])
def test_missing_splits_are_carved_by_image_and_seeded(tmp_path, key):
    root, files = build(tmp_path, key)

    def carved(seed: int) -> dict[str, set[Path]]:
        return {split: {r.path for r in records}
                for split, records in load_dataset(config(root, seed=seed)).splits.items()}

    first = carved(4)
    assert carved(4) == first and carved(5) != first
    assert set.union(*first.values()) == set(files) and sum(map(len, first.values())) == len(files)
    assert load_dataset(config(root, seed=4, test_fraction=0.2)).made == (
        "test carved out of train by image (0.2 of its images, seed 4); "
        "val carved out of train by image (0.25 of its images, seed 4)")


def test_viecap4h_captions_are_split_at_newlines(tmp_path):
    root, files = build(tmp_path, "viecap4h")
    raw = json.loads((root / "train_captions.json").read_text(encoding="utf-8"))
    assert {e["captions"].endswith("\n") for e in raw} == {True, False}
    records = read_source(root).splits["train"]
    assert [len(r.captions) for r in records] == [len(files[r.path].captions) for r in records]
    assert 1 in [len(r.captions) for r in records]  # one caption, written with its newline: still an image


def test_cocos_own_annotations_folder_reads_its_captions_files(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, items(OWN), one_file=False)
    for split in ("train", "val"):  # COCO's download puts these beside the captions files
        (root / "annotations" / f"instances_{split}2017.json").write_text("{}", encoding="utf-8")
        (root / "annotations" / f"person_keypoints_{split}2017.json").write_text("{}", encoding="utf-8")
    assert {split: len(records) for split, records in load_dataset(config(root)).splits.items()} == OWN


def test_a_table_path_written_on_windows_is_found(tmp_path):
    root, files = build(tmp_path, "jsonl")
    edit_rows(lambda rows: [row.update(image=row["image"].replace("/", "\\")) for row in rows])(root)
    records = [r for rs in read_source(root).splits.values() for r in rs]
    assert {r.path for r in records} == set(files) and not any(r.problem for r in records)


@pytest.mark.parametrize("names", [("train_captions", "val_captions", "test_captions"),
                                   ("captions_train", "captions_dev", "captions_test")])
def test_coco_files_named_as_other_sets_name_them(tmp_path, names):
    """COCO-format files named like vieCap4H's (but objects, not a list), or with a dev split."""
    root = tmp_path / "coco"
    files = write_coco(root, items(OWN), one_file=False)
    for split, name in zip(("train", "val", "test"), names):
        (root / f"annotations/captions_{split}2017.json").rename(root / f"{name}.json")
    dataset = load_dataset(config(root))
    assert dataset.format == "coco" and dataset.made == "the dataset's own"
    assert {r.path for rs in dataset.splits.values() for r in rs} == set(files)


def test_a_single_coco_file_without_splits_is_training_data(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, items({"train": 12}), one_file=True)
    edit_json("captions_karpathy.json", lambda raw: [image.pop("split") for image in raw["images"]])(root)
    assert {split: len(records) for split, records in load_dataset(config(root)).splits.items()} == CARVED


def test_coco_lacking_val_carves_val_only(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, items({"train": 8, "test": 2}), one_file=False)
    dataset = load_dataset(config(root))
    assert {split: len(records) for split, records in dataset.splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert dataset.made == "val carved out of train by image (0.25 of its images, seed 0)"


def test_data_format_settles_an_ambiguous_folder(tmp_path):
    root = tmp_path / "both"
    write_coco(root, items(OWN), one_file=False)
    write_table(root, items({"train": 5}, first_id=50), split_column=False)
    assert_raises(lambda: read_source(root), root, "both COCO captions files and a table", "data.format")
    assert load_dataset(config(root, format="coco")).format == "coco"
    table = load_dataset(config(root, format="table"))
    assert table.format == "table" and sum(map(len, table.splits.values())) == 5
    assert_raises(lambda: read_source(root, "viecap4h"), root, "not a viecap4h dataset (data.format)")
    assert_raises(lambda: read_source(root / "captions.csv", "coco"), root, "a file, but data.format coco reads a folder")

    write_rows(root / "more.jsonl", [{"image": table_name(Item(50, ())), "caption": "một con mèo."}])
    assert_raises(lambda: read_source(root, "table"), root, "2 tables (captions.csv, more.jsonl)", "data.root")
    assert read_source(root / "more.jsonl").splits["train"][0].captions == ("một con mèo.",)


def test_a_named_datasets_folder_missing_a_file_says_which(tmp_path):
    root, _ = build(tmp_path, "uitviic")
    (root / "uitviic_captions_val2017.json").unlink()
    assert_raises(lambda: read_source(root), root, "not a UIT-ViIC folder: uitviic_captions_val2017.json missing "
                  "(beside uitviic_captions_train2017.json, uitviic_captions_test2017.json)")


def edit_json(file: str, change):
    def edit(root: Path) -> None:
        raw = json.loads((root / file).read_text(encoding="utf-8"))
        change(raw)
        (root / file).write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return edit


def edit_rows(change):
    """A table's rows changed and written back as they were written (BOM, CRLF, a blank line)."""
    def edit(root: Path) -> None:
        table = next(root.glob("captions.*"))
        if table.suffix == ".csv":
            rows = list(csv_rows(table))
        else:
            rows = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line]
        change(rows)
        write_rows(table, rows)
    return edit


def csv_rows(table: Path):
    with table.open(encoding="utf-8-sig", newline="") as file:
        yield from csv.DictReader(file)


def edit_line(number: int, text: str):
    """A table's line `number` (from 1) replaced by `text`."""
    def edit(root: Path) -> None:
        table = next(root.glob("captions.*"))
        raw = table.read_text(encoding="utf-8")
        end = "\r\n" if "\r\n" in raw else "\n"
        lines = raw.split(end)
        lines[number - 1] = text
        table.write_text(end.join(lines), encoding="utf-8")
    return edit


def write(file: str, text: str):
    return lambda root: (root / file).write_text(text, encoding="utf-8")


def windows_1258(file: str):
    """The file as Vietnamese Windows (cp1258) encodes it: not UTF-8."""
    def edit(root: Path) -> None:
        text = next(root.glob(file)).read_text(encoding="utf-8-sig")
        next(root.glob(file)).write_bytes(unicodedata.normalize("NFD", text).encode("cp1258", errors="replace"))
    return edit


def reuse_train_id(raw: dict) -> None:
    """The val file's first image given the id of a train image (id 1)."""
    old = raw["images"][0]["id"]
    raw["images"][0]["id"] = 1
    for annotation in raw["annotations"]:
        annotation["image_id"] = 1 if annotation["image_id"] == old else annotation["image_id"]


def train_file_name(raw: dict) -> None:
    """The test file's first image made a train image (id 1's file) under its own id: a test image trained on."""
    raw["images"][0]["file_name"] = coco_name(Item(1, ()))


TRAIN_JSON = "uitviic_captions_train2017.json"
ROW_CASES = [  # row 0 is line 1 of a JSONL table, line 2 of a CSV one; row r > 0 line r + 2 of either
    ("empty caption", edit_rows(lambda rows: rows[3].update(caption=" \t ")), ["line 5", "empty caption"]),
    ("bad split", edit_rows(lambda rows: rows[4].update(split="dev")),
     ["line 6", "'split' should be train, val or test, got 'dev'"]),
    ("image in two splits", edit_rows(lambda rows: rows[5].update(split="val")),
     ["line 7", "pics/photo_3.jpg is in train on an earlier line and in val here"]),
    ("image with no split", edit_rows(lambda rows: rows[3].update(split="")),
     ["photo_2.jpg has no 'split' where other images have one"]),
    ("one file named two ways in two splits", edit_rows(lambda rows: rows[1].update(split="test")),
     ["photo_1.jpg and pics/photo_1.jpg are one file, in test and train"]),
    ("not UTF-8", windows_1258("captions.*"), ["not UTF-8 text"]),
]
BAD = [
    *[pytest.param("uitviic", *case[1:], id=f"uitviic-{case[0]}") for case in [
        ("not JSON", write(TRAIN_JSON, '{"images": ['), [TRAIN_JSON, "not valid JSON"]),
        ("not UTF-8", windows_1258(TRAIN_JSON), [TRAIN_JSON, "not UTF-8 text"]),
        ("no images", edit_json(TRAIN_JSON, lambda raw: raw.pop("images")), [TRAIN_JSON, "missing key 'images'"]),
        ("missing key", edit_json(TRAIN_JSON, lambda raw: raw["annotations"][1].pop("caption")),
         [TRAIN_JSON, "annotations[1]: missing key 'caption'"]),
        ("wrong type", edit_json(TRAIN_JSON, lambda raw: raw["images"][0].update(id="1")),
         [TRAIN_JSON, "images[0]: 'id' should be int, got '1'"]),
        ("unknown image id", edit_json(TRAIN_JSON, lambda raw: raw["annotations"][0].update(image_id=999)),
         [TRAIN_JSON, "annotations[0]: caption points at unknown image id 999"]),
        ("empty caption", edit_json(TRAIN_JSON, lambda raw: raw["annotations"][2].update(caption="  \n ")),
         [TRAIN_JSON, "annotations[2]: empty caption"]),
        ("duplicate image id", edit_json(TRAIN_JSON, lambda raw: raw["images"][1].update(id=1)),
         [TRAIN_JSON, "images[1]: duplicate image id 1"]),
        ("id in two split files", edit_json("uitviic_captions_val2017.json", reuse_train_id),
         ["image id 1 is in both train and val"]),
        ("file in two split files", edit_json("uitviic_captions_test2017.json", train_file_name),
         ["000000000001.jpg is in both train and test"]),
    ]],
    *[pytest.param("coco_one_file", *case[1:], id=f"coco-{case[0]}") for case in [
        ("bad split", edit_json("captions_karpathy.json", lambda raw: raw["images"][0].update(split="dev")),
         ["captions_karpathy.json: images[0]", "'split' should be train, val, test or restval, got 'dev'"]),
        ("no split", edit_json("captions_karpathy.json", lambda raw: raw["images"][2].pop("split")),
         ["captions_karpathy.json: images[2]: missing key 'split'"]),
    ]],
    *[pytest.param("viecap4h", *case[1:], id=f"viecap4h-{case[0]}") for case in [
        # vieCap4H's file is a list: an object is taken for a COCO set's training file (as below).
        ("not a list", write("train_captions.json", '{"id": "0001.jpg", "captions": "một con mèo."}'),
         ["train_captions.json", "missing key 'images'"]),
        ("not UTF-8", windows_1258("train_captions.json"), ["train_captions.json", "not UTF-8 text"]),
        ("missing key", edit_json("train_captions.json", lambda raw: raw[0].pop("captions")),
         ["train_captions.json: [0]: missing key 'captions'"]),
        ("wrong type", edit_json("train_captions.json", lambda raw: raw[1].update(captions=["một", "hai"])),
         ["train_captions.json: [1]: 'captions' should be str"]),
        ("empty captions", edit_json("train_captions.json", lambda raw: raw[2].update(captions="\n  \n")),
         ["train_captions.json: [2]: empty caption"]),
        ("listed twice", edit_json("train_captions.json", lambda raw: raw.append(dict(raw[0]))),
         ["train_captions.json: [12]: image 0001.jpg listed twice"]),
    ]],
    *[pytest.param(kind, *case[1:], id=f"{kind}-{case[0]}") for kind in ("csv", "jsonl") for case in ROW_CASES],
    pytest.param("csv", edit_line(1, "\ufeffimg,caption,split"),
                 ["captions.csv", "no 'image' column in its header (img, caption, split)"], id="csv-no column"),
    pytest.param("csv", edit_line(4, "pics/photo_1.jpg"),
                 ["captions.csv: line 4: missing key 'caption'"], id="csv-short row"),
    pytest.param("jsonl", edit_line(4, '{"image": "photo_1.jpg", "caption": "một'),
                 ["captions.jsonl: line 4: not valid JSON"], id="jsonl-bad line"),
    pytest.param("jsonl", edit_rows(lambda rows: rows[2].pop("caption")),
                 ["captions.jsonl: line 4: missing key 'caption'"], id="jsonl-missing key"),
    pytest.param("jsonl", edit_rows(lambda rows: rows[2].update(image=5)),
                 ["captions.jsonl: line 4: 'image' should be str, got 5"], id="jsonl-wrong type"),
]


@pytest.mark.parametrize("key, spoil, fragments", BAD)
def test_bad_input_is_one_clear_line(tmp_path, key, spoil, fragments):
    root, _ = build(tmp_path, key)
    spoil(root)
    assert_raises(lambda: load_dataset(config(root)), root, *fragments)


@pytest.mark.parametrize("file, text", [("train_captions.json", "[]"),
                                        ("train_data.json", '{"images": [], "annotations": []}')])
def test_a_file_of_no_images_is_one_clear_line(tmp_path, file, text):
    root = make_dataset(tmp_path / "ktvic", 2, 1) if file == "train_data.json" else tmp_path / "viecap4h"
    root.mkdir(exist_ok=True)
    (root / file).write_text(text, encoding="utf-8")
    assert_raises(lambda: load_dataset(config(root)), root, file)


def break_names(root: Path, files: dict[Path, Item]) -> tuple[str, str]:
    """Two train images' names spoilt: one file deleted, one copied into the other COCO folder."""
    first, second = [path for path, item in files.items() if item.split == "train"][:2]
    first.unlink()
    other = "val2017" if second.parent.name == "train2017" else "train2017"
    shutil.copyfile(second, root / "coco" / other / second.name)
    return first.name, second.name


def test_names_found_nowhere_or_twice_are_problems(tmp_path):
    root, files = build(tmp_path, "uitviic")
    gone, twice = break_names(root, files)
    problems = {r.path.name: r.problem for records in read_source(root).splits.values() for r in records if r.problem}
    assert problems.keys() == {gone, twice}
    assert problems[gone] == f"not found under {root}"
    assert problems[twice] == f"found 2 times under {root} (coco/train2017/{twice}, coco/val2017/{twice})"


def test_a_table_path_with_folders_is_that_file_a_bare_name_must_be_unique(tmp_path):
    root, files = build(tmp_path, "csv")
    for path in files:
        shutil.copyfile(path, root / path.name)  # each image also at the top, beside pics/
    read = {r.path.relative_to(root).as_posix(): r.problem for rs in read_source(root).splits.values() for r in rs}
    # Image 1 is named both ways: its bare name no longer merges with pics/photo_1.jpg.
    assert read["pics/photo_1.jpg"] is None and read["pics/photo_3.jpg"] is None
    assert read["photo_2.jpg"].startswith("found 2 times") and read["photo_1.jpg"].startswith("found 2 times")


def test_uitviic_from_ktvic_keeps_images_captions_and_ids(tmp_path):
    ktvic = make_dataset(tmp_path / "ktvic", 6, 3, size=32)
    out = uitviic_from_ktvic(ktvic, tmp_path / "uitviic", val_images=2)
    source, converted = read_source(ktvic).splits, read_source(out)
    assert converted.format == "uitviic"
    assert {split: len(records) for split, records in converted.splits.items()} == {"train": 4, "val": 2, "test": 3}
    assert [r.image_id for r in converted.splits["val"]] == [r.image_id for r in source["train"][:2]]
    for records in converted.splits.values():
        assert {r.path.parent.name for r in records} == {"train2017", "val2017"}
        assert all(r.path.name == coco_name(Item(r.image_id, ())) for r in records)
    before = {r.image_id: (r.captions, r.path.read_bytes()) for rs in source.values() for r in rs}
    assert {r.image_id: (r.captions, r.path.read_bytes()) for rs in converted.splits.values() for r in rs} == before


def test_extract_lists_unresolved_names_or_skips_them(project):
    root, files = build(project, "uitviic")
    gone, twice = break_names(root, files)
    edit_params(project, "data", "root", "my_set")
    assert_clear_error(invoke("extract"), "2 bad image(s) in train", f"{gone} (not found under",
                       f"{twice} (found 2 times under")

    result = invoke("extract", "--skip-bad-images")
    assert result.exit_code == 0, result.output
    store = open_store(project / "artifacts/features/clip/train.h5", {"dataset": "UIT-ViIC"})
    ids = {files[path].image_id for path in files if path.name in (gone, twice)}
    assert sorted(store.attrs["skipped_ids"]) == sorted(ids) and not ids & set(store.image_ids.tolist())
    assert sorted(name.split(":")[0] for name in store.attrs["skipped_images"]) == sorted([gone, twice])


@pytest.mark.slow
def test_dvc_repro_runs_end_to_end_on_a_uitviic_folder(tiny, tmp_path):
    """DVC from a UIT-ViIC folder (the small project's images laid out as UIT-ViIC lays them: its own val split,
    its images in COCO's two folders) to ViCLIPCap's metrics: the other models read the dataset through the same
    calls, the demo runs them all on KTVIC, and tests/test_report.py puts these metrics' dataset in the report."""
    project = make_project(tiny, tmp_path / "project")
    uitviic_from_ktvic(project / "ktvic", project / "uitviic", val_images=3)
    shutil.rmtree(project / "ktvic")
    edit_params(project, "data", "root", "uitviic")
    dvc(dvc_project(project), "repro", "score_viclipcap")

    metrics = json.loads((project / "artifacts/metrics/viclipcap.json").read_text(encoding="utf-8"))
    assert (metrics["dataset"], metrics["splits"], metrics["images"]) == ("UIT-ViIC", "the dataset's own", 4)
    spec = json.loads((project / "artifacts/models/viclipcap/config.json").read_text(encoding="utf-8"))
    # Trained on UIT-ViIC, and free to score another dataset's test split: its store fingerprint says no dataset.
    assert spec["training"]["dataset"] == "UIT-ViIC" and "dataset" not in spec["fingerprints"]["store"]
    for split, images in {"train": 9, "val": 3, "test": 4}.items():
        store = open_store(project / f"artifacts/features/clip/{split}.h5", {"dataset": "UIT-ViIC", "split": split})
        assert len(store) == images


def test_linked_folders_are_walked_once_and_a_loop_ends(tmp_path):
    """COCO's folder linked in, its train2017/ linked again beside it, and a link back up: each image once."""
    coco, files = build(tmp_path, "uitviic")
    root = tmp_path / "linked"
    root.mkdir()
    for name in ("uitviic_captions_train2017.json", "uitviic_captions_val2017.json", "uitviic_captions_test2017.json"):
        shutil.copyfile(coco / name, root / name)
    (root / "coco").symlink_to(coco / "coco", target_is_directory=True)
    (root / "train2017").symlink_to(coco / "coco/train2017", target_is_directory=True)
    (coco / "coco/val2017/up").symlink_to(coco, target_is_directory=True)
    records = [r for rs in read_source(root).splits.values() for r in rs]
    assert not [r.problem for r in records if r.problem]
    assert {r.path.resolve() for r in records} == {path.resolve() for path in files}


def test_a_path_with_folders_that_is_not_there_is_not_taken_for_another(tmp_path):
    root, _ = build(tmp_path, "csv_unsplit")
    edit_rows(lambda rows: rows[0].update(image="gone/photo_1.jpg"))(root)
    problems = {r.path.relative_to(root).as_posix(): r.problem
                for rs in read_source(root).splits.values() for r in rs if r.problem}
    assert problems == {"gone/photo_1.jpg": f"not found under {root}"}


def test_a_test_store_of_other_images_is_refused_before_decoding(tmp_path):
    store = FeatureStore(tmp_path / "test.h5", np.array([1, 2, 99]), {}, rows=np.zeros((3, 4), np.float32))
    with pytest.raises(ViclipError, match=r"test.h5: 1 images not in the test split \(e.g. id 99\)"):
        stored({1: ["một"], 2: ["hai"], 3: ["ba"]}, store)
    assert stored({1: ["một"], 2: ["hai"], 99: ["x"], 3: ["ba"]}, store) == {1: ["một"], 2: ["hai"], 99: ["x"]}


def test_a_store_from_before_datasets_were_recorded_is_ktvics(tmp_path):
    path = tmp_path / "train.h5"
    with write_store(path, {"encoder": "clip"}) as writer:
        writer.append(np.array([1]), np.zeros((1, 4), np.float32))
    with h5py.File(path, "a") as file:
        assert "dataset" not in file.attrs
    assert open_store(path, {"dataset": "KTVIC"}).attrs["dataset"] == "KTVIC"
    with pytest.raises(ViclipError, match="dataset='KTVIC' but 'UIT-ViIC' is expected"):
        open_store(path, {"dataset": "UIT-ViIC"})


def test_a_name_in_another_letter_case_is_found_where_it_is_the_only_one(tmp_path):
    root, files = build(tmp_path, "viecap4h")
    first, second = sorted(files)[:2]
    first.rename(first.with_name(first.name.upper()))  # 0001.JPG on disk, 0001.jpg in the file
    second.with_name(second.stem + ".JPG").write_bytes(second.read_bytes())  # both cases on disk: the exact one
    found = {r.path.name.lower(): (r.path.name, r.problem) for r in read_source(root).splits["train"]}
    assert found[first.name] == (first.name.upper(), None)
    assert found[second.name] == (second.name, None)
