"""Every command, and every bad input: one clear line, exit 1, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from pipeline.core.config import dump_config, load_config
from pipeline.core.registry import MODELS
from tests.conftest import invoke


def assert_clear_error(result, *fragments: str) -> str:
    output = result.output.strip()
    assert result.exit_code == 1, output
    assert "Traceback" not in output and not isinstance(result.exception, (AssertionError, TypeError))
    lines = output.splitlines()
    assert lines[-1].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def edit_params(project: Path, section: str, key: str, value) -> None:
    params = load_config(project / "params.yaml").model_dump()
    params[section][key] = value
    (project / "params.yaml").write_text(dump_config(params))


def edit_annotations(project: Path, change) -> None:
    path = project / "ktvic/train_data.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")


def test_stages_run_from_the_cli_and_score_a_results_file(project):
    assert invoke("extract").exit_code == 0
    assert invoke("train").exit_code == 0
    result = invoke("score")
    assert result.exit_code == 0, result.output
    assert "cider" in result.output and (project / "artifacts/metrics/viclipcap.json").is_file()

    captions = project / "artifacts/metrics/viclipcap.captions.json"
    again = invoke("score", "--captions", str(captions), "--out", "rescored.json")
    assert again.exit_code == 0, again.output
    rescored = json.loads((project / "rescored.json").read_text())
    decoded = json.loads((project / "artifacts/metrics/viclipcap.json").read_text())
    assert rescored["cider"] == decoded["cider"] and rescored["bleu_4"] == decoded["bleu_4"]


def test_score_captions_refuses_a_model_it_would_not_use(tmp_path):
    """A results file is scored as it is: naming a model to decode with is a mistake, not something to ignore."""
    for option in (("--model", "cnn_lstm"), ("--model-dir", str(tmp_path))):
        result = invoke("score", "--captions", "results.json", *option)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            "error: --model and --model-dir choose what to decode; --captions scores the file's captions")


def test_the_baseline_branch_and_the_comparison_run_from_the_cli(project):
    for args in (("extract", "--store", "cnn"), ("train", "--model", "cnn_lstm"), ("score", "--model", "cnn_lstm"),
                 ("extract",), ("train",), ("score",)):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
    result = invoke("compare")
    assert result.exit_code == 0, result.output
    report = (project / "artifacts/report/comparison.md").read_text()
    assert "| Metric | CNN+LSTM | ViCLIPCap |" in report and (project / "artifacts/report/comparison.png").is_file()


@pytest.mark.parametrize("args", [("train", "--model", "lstm"), ("extract", "--store", "vgg"), ("score", "--model", "x")])
def test_unknown_model_or_store_names_the_choices(project, args):
    result = invoke(*args)
    assert result.exit_code == 2 and "must be one of" in result.output and "Traceback" not in result.output


def test_extract_one_split(project):
    assert invoke("extract", "--split", "val").exit_code == 0
    assert sorted(p.name for p in (project / "artifacts/features/clip").glob("*.h5")) == ["val.h5"]


@pytest.mark.parametrize("model", ["viclipcap", "cnn_lstm"])
def test_caption_real_photos_in_any_colour_mode(demo, tmp_path, monkeypatch, model):
    chelsea = Image.fromarray(photos.chelsea())
    files = {
        "astronaut.jpg": Image.fromarray(photos.astronaut()),
        "camera.png": Image.fromarray(photos.camera()),  # greyscale
        "chelsea_rgba.png": chelsea.convert("RGBA"),
        "chelsea_cmyk.jpg": chelsea.convert("CMYK"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    monkeypatch.chdir(demo)
    paths = [str(tmp_path / name) for name in files]
    result = invoke("caption", "--model", model, *paths)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    assert all(line.split("\t")[1].strip() for line in lines)
    as_json = json.loads(invoke("caption", "--model", model, "--json", *paths).stdout)
    assert [(r["image"], r["caption"]) for r in as_json] == [tuple(line.split("\t")) for line in lines]


@pytest.mark.parametrize("change, fragments", [
    (lambda p: p.__setitem__("data", {**p["data"], "root": "nowhere"}), ["nowhere", "data root not found"]),
    (lambda p: p["train"]["viclipcap"].__setitem__("lr", "fast"), ["train.viclipcap.lr"]),
    (lambda p: p["train"]["cnn_lstm"].__setitem__("epochs", 2.5), ["train.cnn_lstm.epochs"]),
    (lambda p: p["train"].pop("cnn_lstm"), ["missing key 'train.cnn_lstm'"]),
    (lambda p: p["lstm"].__setitem__("dropout", 1.5), ["lstm.dropout"]),
    (lambda p: p["mapper"].__setitem__("depth", 3), ["unknown key 'mapper.depth'"]),
    (lambda p: p["score"].pop("beam_size"), ["missing key 'score.beam_size'"]),
    (lambda p: p["mapper"].__setitem__("type", "lstm"), ["mapper.type"]),
])
def test_bad_params(project, change, fragments):
    params = load_config("params.yaml").model_dump()
    change(params)
    (project / "params.yaml").write_text(dump_config(params))
    assert_clear_error(invoke("extract"), "params.yaml" if "root" not in fragments[-1] else "", *fragments)


def test_params_file_missing(project):
    assert_clear_error(invoke("train", "--params", "other.yaml"), "other.yaml")


def test_root_in_neither_layout(project):
    (project / "ktvic/train_data.json").unlink()
    assert_clear_error(invoke("extract"), "not a KTVIC folder")


@pytest.mark.parametrize("change, fragments", [
    (lambda raw: raw["annotations"][3].pop("caption"), ["annotations[3]", "'caption'"]),
    (lambda raw: raw["images"][0].pop("filename"), ["images[0]", "'filename'"]),
    (lambda raw: raw["annotations"][0].__setitem__("image_id", 999), ["annotations[0]", "unknown image id 999"]),
    (lambda raw: raw["annotations"][2].__setitem__("caption", "  "), ["annotations[2]", "empty caption"]),
    (lambda raw: raw.__setitem__("annotations", [a for a in raw["annotations"] if a["image_id"] != 1]),
     ["image id 1", "no captions"]),
    (lambda raw: raw.pop("images"), ["'images'"]),
])
def test_bad_annotations(project, change, fragments):
    edit_annotations(project, change)
    assert_clear_error(invoke("extract"), "train_data.json", *fragments)
    assert not (project / "artifacts").exists()


def test_malformed_json(project):
    (project / "ktvic/train_data.json").write_text('{"images": [', encoding="utf-8")
    assert_clear_error(invoke("extract"), "train_data.json", "not valid JSON")


def test_bad_image_files_are_all_listed_and_nothing_is_written(project):
    images = project / "ktvic/train-images"
    (images / "000001.jpg").unlink()
    truncated = (images / "000002.jpg").read_bytes()
    (images / "000002.jpg").write_bytes(truncated[: len(truncated) // 3])
    (images / "000003.jpg").write_text("not a picture")
    line = assert_clear_error(invoke("extract"), "3 bad image(s)", "000001.jpg (missing)", "000002.jpg", "000003.jpg (not an image)")
    assert "--skip-bad-images" in line
    store = project / "artifacts/features/clip"
    assert not store.exists() or not any(store.iterdir())

    assert invoke("extract", "--skip-bad-images").exit_code == 0
    from pipeline.data.features import open_store

    written = {split: open_store(store / f"{split}.h5", {}) for split in ("train", "val")}
    skipped = written["train"].attrs["skipped_ids"] + written["val"].attrs["skipped_ids"]
    assert sorted(skipped) == [1, 2, 3]
    assert {1, 2, 3}.isdisjoint(np.concatenate([s.image_ids for s in written.values()]).tolist())
    assert invoke("train").exit_code == 0  # training uses the images that were encoded


def test_store_from_another_encoder_is_refused(project):
    assert invoke("extract").exit_code == 0
    edit_params(project, "clip", "normalize", False)
    assert_clear_error(invoke("train"), "train.h5", "normalized=True", "re-run `viclip extract`")


def test_model_dir_that_does_not_match_its_weights(project):
    assert invoke("extract").exit_code == 0 and invoke("train").exit_code == 0
    config = project / "artifacts/models/viclipcap/config.json"
    raw = json.loads(config.read_text())
    raw["sections"]["mapper"]["prefix_length"] += 1
    config.write_text(json.dumps(raw))
    assert_clear_error(invoke("score"), "mapper.safetensors", "do not fit")
    config.write_text(json.dumps({**raw, "sections": {**raw["sections"], "lm": None}}))
    assert_clear_error(invoke("score"), "config.json", "key 'sections.lm'")
    config.write_text(json.dumps({**raw, "sections": {k: v for k, v in raw["sections"].items() if k != "lm"}}))
    assert_clear_error(invoke("score"), "config.json", "missing key 'sections.lm'")  # checked as it is loaded
    shutil.rmtree(project / "artifacts/models/viclipcap")
    assert_clear_error(invoke("score"), "viclipcap", "not a model directory")


@pytest.mark.parametrize("results, fragments", [
    ([{"image_id": 424242, "caption": "x"}], ["unknown image ids: 424242"]),
    ([{"image_id": 100000, "caption": "x"}], ["no caption for 3 test images"]),
    ({"image_id": 1}, ["expected a JSON list"]),
    ([{"image_id": "100000", "caption": "x"}], ["entry 0"]),
])
def test_score_captions_bad_results(project, results, fragments):
    (project / "results.json").write_text(json.dumps(results))
    assert_clear_error(invoke("score", "--captions", "results.json"), "results.json", *fragments)


def test_unreachable_hub_weights_name_what_to_set(project):
    assert invoke("extract").exit_code == 0
    edit_params(project, "lm", "name", "imthanhlv/gpt2news")
    assert_clear_error(invoke("train"), "imthanhlv/gpt2news", "lm.name")
    assert not (project / "artifacts/models").exists()

    shutil.rmtree(project / "artifacts")
    edit_params(project, "clip", "pretrained", "openai")
    edit_params(project, "clip", "config", None)
    edit_params(project, "clip", "model", "ViT-B-32-quickgelu")
    result = invoke("extract")
    assert_clear_error(result, "ViT-B-32-quickgelu/openai", "clip.pretrained")
    assert len(result.output.strip().splitlines()) == 1
    assert not (project / "artifacts").exists()


@pytest.mark.parametrize("key, value, fragments", [
    ("weights", "IMAGENET1K_V1", ["resnet18/IMAGENET1K_V1", "no network", "cnn.weights"]),
    ("weights", "NOPE", ["cnn.weights", "'NOPE'", "IMAGENET1K_V1"]),
    ("model", "resnet9000", ["cnn.model", "resnet9000"]),
    ("model", "vit_b_16", ["cnn.model", "no convolutional trunk"]),
    ("model", "resnet34", ["resnet18.safetensors", "not weights for resnet34"]),
])
def test_bad_cnn_settings(project, key, value, fragments):
    edit_params(project, "cnn", key, value)
    result = invoke("extract", "--store", "cnn")
    assert_clear_error(result, *fragments)
    assert len(result.output.strip().splitlines()) == 1
    assert not (project / "artifacts").exists()


def test_baseline_store_and_model_dir_are_checked(project):
    assert invoke("extract", "--store", "cnn").exit_code == 0
    edit_params(project, "cnn", "grid", 2)
    assert_clear_error(invoke("train", "--model", "cnn_lstm"), "cnn/train.h5", "grid=3", "re-run `viclip extract`")
    edit_params(project, "cnn", "grid", 3)
    assert invoke("train", "--model", "cnn_lstm").exit_code == 0
    (project / "artifacts/models/cnn_lstm/vocab.json").unlink()
    assert_clear_error(invoke("score", "--model", "cnn_lstm"), "vocab.json", "vocabulary missing")


def test_a_stop_text_of_several_tokens_is_one_clear_line(project):
    assert invoke("extract").exit_code == 0
    edit_params(project, "lm", "stop", "hình tròn")
    assert_clear_error(invoke("train"), "lm.stop 'hình tròn'", "exactly one token")
    assert not (project / "artifacts/models").exists()


def test_score_records_unfinished_captions_and_warns(project):
    assert invoke("extract").exit_code == 0 and invoke("train").exit_code == 0
    edit_params(project, "score", "max_length", 1)  # one token: no caption can both say something and stop
    result = invoke("score")
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "artifacts/metrics/viclipcap.json").read_text())
    assert metrics["unfinished"] == 4 and metrics["max_length"] == 1
    assert "warning: 4 of 4 captions reached score.max_length (1) without stopping" in result.output


def test_max_length_is_capped_by_the_lm_context(project):
    assert invoke("extract").exit_code == 0 and invoke("train").exit_code == 0
    edit_params(project, "score", "max_length", 10_000)
    result = invoke("score")
    assert result.exit_code == 0 and "\nmax_length: score.max_length 10000 capped at" in result.output
    metrics = json.loads((project / "artifacts/metrics/viclipcap.json").read_text())
    config = load_config(project / "params.yaml")
    lm_config = json.loads((Path(config.lm.name) / "config.json").read_text())
    assert metrics["max_length"] == lm_config["n_positions"] - config.mapper.prefix_length
    assert "10000 capped at" in metrics["notes"]["max_length"]


def test_score_captions_leaves_out_images_that_extraction_skipped(project):
    broken = project / "ktvic/public-test-images/100001.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    results = [{"image_id": i, "caption": "có một hình tròn màu đỏ"} for i in range(100_000, 100_004)]
    (project / "results.json").write_text(json.dumps(results))

    assert invoke("score", "--captions", "results.json", "--out", "all.json").exit_code == 0
    everything = json.loads((project / "all.json").read_text())
    assert everything["images"] == 4 and everything["dropped"] == 0  # no store: every reference

    assert invoke("extract", "--split", "test", "--skip-bad-images").exit_code == 0
    result = invoke("score", "--captions", "results.json", "--out", "stored.json")
    assert result.exit_code == 0, result.output
    stored = json.loads((project / "stored.json").read_text())
    assert stored["images"] == 3 and stored["dropped"] == 1
    assert "3 test images from results.json, 1 captions dropped (images skipped at extraction)" in result.output


def test_score_captions_under_each_protocol_keeps_the_metrics_when_spice_breaks(project, tmp_path, monkeypatch):
    results = [{"image_id": i, "caption": "có một hình tròn màu đỏ ở bên trái"} for i in range(100_000, 100_004)]
    (project / "results.json").write_text(json.dumps(results))
    jars = tmp_path / "corenlp"  # CoreNLP's jars present but unusable, as a new user met them
    jars.mkdir()
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (jars / name).write_bytes(b"truncated download")
    monkeypatch.setenv("VICLIP_CORENLP", str(jars))

    result = invoke("score", "--captions", "results.json", "--protocol", "word", "--out", "word.json")
    assert result.exit_code == 0, result.output
    word = json.loads((project / "word.json").read_text())
    assert "cider" not in word and word["word"]["cider"] > 0 and word["word"]["meteor"] is not None
    assert word["word"]["protocol"]["segmenter"]["name"] == "underthesea"
    assert word["word"]["spice"] is None and word["word"]["notes"]["spice"].startswith("SPICE exited with code 1")
    assert "word protocol:" in result.output and "syllable protocol:" not in result.output
    assert "spice (word): n/a, SPICE exited with code 1" in result.output

    assert invoke("score", "--captions", "results.json", "--out", "both.json").exit_code == 0  # params: both
    both = json.loads((project / "both.json").read_text())
    assert both["word"]["cider"] == word["word"]["cider"] and both["cider"] != both["word"]["cider"]
    assert both["spice"] is None and both["notes"]["spice"].startswith("SPICE exited with code 1")

    refused = invoke("score", "--protocol", "word")
    assert refused.exit_code == 2 and "--protocol goes with --captions" in refused.output
    refused = invoke("score", "--captions", "results.json", "--protocol", "words")
    assert refused.exit_code == 2 and "--protocol must be one of syllable, word, both" in refused.output


def test_decompression_bombs_are_bad_images_to_extract_and_caption(project, demo, monkeypatch):
    """A few kilobytes of PNG that decode to 100M pixels (Pillow only warns) or 200M (Pillow raises an
    error that is no OSError): both are listed as bad images, checked before their pixels are decoded."""
    images = project / "ktvic/train-images"
    Image.new("1", (10_000, 10_000)).save(images / "000001.jpg", "PNG")
    Image.new("1", (20_000, 10_000)).save(images / "000002.jpg", "PNG")
    assert_clear_error(invoke("extract"), "2 bad image(s)", "000001.jpg (too large: Image size (100000000 pixels)",
                       "000002.jpg (too large: Image size (200000000 pixels)")
    monkeypatch.chdir(demo)
    assert_clear_error(invoke("caption", str(images / "000001.jpg"), str(images / "000002.jpg")),
                       "2 bad image(s)", "000001.jpg (too large", "000002.jpg (too large")


def test_serve_without_a_trained_model_or_with_an_unknown_one(project):
    assert_clear_error(invoke("serve", "--model", "all"), "no trained model under artifacts/models")
    assert_clear_error(invoke("serve", "--model", "viclipcap"), "artifacts/models/viclipcap", "not a model directory")
    result = invoke("serve", "--model", "lstm")
    assert result.exit_code == 2 and f"--model must be one of {', '.join(MODELS)}, all" in result.output
