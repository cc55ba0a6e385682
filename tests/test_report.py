"""The comparison report: the table says what the metrics files say, bold marks the best run,
the published figures sit beside them untouched, any number of models keep the display order,
and the chart is written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.figure
import pytest
from PIL import Image

from pipeline.core import paths, registry
from pipeline.core.config import load_config
from pipeline.core.errors import ViclipError
from pipeline.evaluation.protocols import PROTOCOLS
from pipeline.evaluation.report import bar_chart, comparison_markdown, display_order
from pipeline.models import ModelSpec
from stages import compare
from tests.report_tables import read_markdown_table

SYLLABLE = {"name": "syllable", **PROTOCOLS["syllable"].description()}
WORD = {"name": "word", **PROTOCOLS["word"].description()}
SPICE_NOTE = "SPICE needs Stanford CoreNLP 3.6.0; it cannot be fetched offline"
SCORES = {
    "cnn_lstm": {"bleu_1": 0.61234, "bleu_2": 0.45, "bleu_3": 0.33, "bleu_4": 0.24567, "meteor": None,
                 "rouge_l": 0.5, "cider": 0.61, "spice": None},
    "viclipcap": {"bleu_1": 0.6, "bleu_2": 0.5, "bleu_3": 0.4, "bleu_4": 0.31, "meteor": 0.29,
                  "rouge_l": 0.50001, "cider": 0.83, "spice": None},
}


def model_config(store: dict, training: dict, **sections) -> dict:
    """What the report reads of a model directory's config.json (pipeline.models.ModelSpec.to_json)."""
    return {"store": store["encoder"], "sections": sections, "fingerprints": {"store": store},
            "training": {"device": "cpu", "precision": "fp32", **training}}


VICLIPCAP_LM = {"name": "imthanhlv/gpt2news", "stop": ".", "train": "frozen"}
MODELS = {
    "cnn_lstm": model_config({"encoder": "cnn", "model": "resnet101"},
                             {"trainable_parameters": 12_345_678, "train_seconds": 3600.04, "best_epoch": 7}),
    "viclipcap": model_config({"encoder": "clip", "model": "ViT-B-32-quickgelu"},
                              {"trainable_parameters": 3_456_789, "train_seconds": 812.34, "best_epoch": 9,
                               "device": "NVIDIA H100", "precision": "bf16 autocast"}, lm=VICLIPCAP_LM),
}
# Variants, each a model of its own; `viclipcap_lora` stands for a model the report has no display name for.
VARIANT_SCORES = {
    "viclipcap_scst": {**SCORES["viclipcap"], "cider": 0.91, "bleu_4": 0.33, "rouge_l": 0.50004},
    "viclipcap_rag": {**SCORES["viclipcap"], "cider": 0.88, "bleu_4": 0.34},
    "viclipcap_lora": {**SCORES["viclipcap"], "cider": 0.85, "rouge_l": 0.49},
}
VARIANT_MODELS = {
    "viclipcap_scst": {**MODELS["viclipcap"], "training": {
        **MODELS["viclipcap"]["training"], "start_from": {"model": "viclipcap", "weights": "sha256:0"}}},
    "viclipcap_rag": {**MODELS["viclipcap"], "sections": {"lm": VICLIPCAP_LM, "retrieval": {"k": 4}}},
    "viclipcap_lora": {**MODELS["viclipcap"], "sections": {"lm": {**VICLIPCAP_LM, "train": "lora"}}},
}


def metrics(**changes) -> dict:
    files = {name: {**scores, "model": name, "split": "test", "images": 558, "protocol": dict(SYLLABLE),
                    "notes": {"spice": SPICE_NOTE}} for name, scores in SCORES.items()}
    files["viclipcap"].update(changes)
    return files


def with_words(files: dict, **changes) -> dict:
    """`files` with a word block each: the syllable figures less 0.1, as if words matched less often."""
    for name, file in files.items():
        file["word"] = {**{k: None if v is None else v - 0.1 for k, v in SCORES[name].items()},
                        "protocol": dict(WORD), "notes": {"spice": SPICE_NOTE}}
    files["viclipcap"]["word"].update(changes)
    return files


def with_variants(files: dict, *models: str) -> dict:
    """`files` and the variants' metrics files, in `models`' order (ahead of `files`: the report reorders)."""
    variants = {m: {**VARIANT_SCORES[m], "model": m, "split": "test", "images": 558, "protocol": dict(SYLLABLE),
                    "notes": {"spice": SPICE_NOTE}} for m in models}
    return {**variants, **dict(reversed(files.items()))}


def header(markdown: str, first: str = "| Metric |") -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(first))
    return [cell.strip() for cell in line.strip("|").split("|")]


def row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_bold_marks_the_better_run_in_each_row():
    markdown = comparison_markdown(metrics(), MODELS)
    assert row(markdown, "BLEU-4")[:2] == ["0.2457", "**0.3100**"]
    assert row(markdown, "BLEU-1")[:2] == ["**0.6123**", "0.6000"]
    assert row(markdown, "ROUGE-L")[:2] == ["**0.5000**", "**0.5000**"]  # equal as shown: a tie
    assert row(markdown, "METEOR")[:2] == ["n/a", "**0.2900**"]
    assert row(markdown, "SPICE")[:2] == ["n/a", "n/a"]


def test_reported_columns_are_the_published_figures_never_bold():
    markdown = comparison_markdown(metrics(), MODELS)
    table = read_markdown_table(markdown)
    assert table["CNN+LSTM (reported)"] == {"bleu_4": 0.2572, "rouge_l": 0.4895, "cider": 0.6282, "meteor": 0.2995,
                                            "spice": 0.0782, "bleu_1": None, "bleu_2": None, "bleu_3": None}
    assert table["ViCLIPCap (reported)"] == {"bleu_4": 0.3431, "rouge_l": 0.5204, "cider": 0.8127, "meteor": 0.3194,
                                             "spice": 0.0829, "bleu_1": 0.6731, "bleu_2": 0.5437, "bleu_3": 0.4316}
    reported_cells = [cell for label in ("BLEU-4", "CIDEr", "BLEU-1") for cell in row(markdown, label)[2:]]
    assert not any("**" in cell for cell in reported_cells)
    assert row(markdown, "BLEU-1")[2] == "—"
    assert "not re-run" in markdown and "EfficientNetV2-S" in markdown and "ViT-B/16" in markdown


def test_table_reads_back_as_the_metrics_files():
    table = read_markdown_table(comparison_markdown(metrics(), MODELS))
    for name, column in (("cnn_lstm", "CNN+LSTM"), ("viclipcap", "ViCLIPCap")):
        assert table[column] == {k: None if v is None else round(v, 4) for k, v in SCORES[name].items()}


def test_report_states_split_models_protocol_notes_and_chart():
    markdown = comparison_markdown(metrics(), MODELS, chart="chart.png")
    assert "`test`, 558 images" in markdown
    assert "# CNN+LSTM vs ViCLIPCap\n" in markdown and "2 models scored" in markdown
    assert "| ViCLIPCap | CLIP ViT-B-32-quickgelu | frozen | — | 3,456,789 | 812.3 | 9 | NVIDIA H100 |" in markdown
    assert "| CNN+LSTM | CNN resnet101 | — | — | 12,345,678 | 3600.0 | 7 | cpu |" in markdown
    assert header(markdown) == ["Metric", "CNN+LSTM", "ViCLIPCap", "CNN+LSTM (reported)", "ViCLIPCap (reported)"]
    assert f"Tokenisation: {SYLLABLE['tokenisation']}." in markdown
    assert f"- SPICE (syllable): {SPICE_NOTE}" in markdown
    assert "](chart.png)" in markdown


@pytest.mark.parametrize("field, value", [
    ("images", 550), ("split", "val"), ("protocol", {**SYLLABLE, "tokenisation": "word-segmented"}),
    ("dataset", "UIT-ViIC"),
])
def test_runs_under_different_protocols_are_not_compared(field, value, tmp_path):
    with pytest.raises(ViclipError, match=f"disagree on {field}"):
        comparison_markdown(metrics(**{field: value}), MODELS)
    with pytest.raises(ViclipError, match=f"disagree on {field}"):
        bar_chart(metrics(**{field: value}), tmp_path / "comparison.png")
    assert list(tmp_path.iterdir()) == []


def test_another_datasets_run_is_named_and_shown_without_ktvics_published_figures(tmp_path, monkeypatch):
    made = "the dataset's own"
    files = {name: {**file, "dataset": "UIT-ViIC", "splits": made} for name, file in metrics().items()}
    markdown = comparison_markdown(files, MODELS)
    assert f"UIT-ViIC, split `test`, 558 images (splits: {made})" in markdown
    assert header(markdown) == ["Metric", "CNN+LSTM", "ViCLIPCap"] and "(reported)" not in markdown
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", lambda self, *a, **k: drawn.append(
        [t.get_label() for t in self.axes[0].containers]))
    bar_chart(files, tmp_path / "comparison.png")
    assert drawn == [["CNN+LSTM", "ViCLIPCap"]]
    ktvic = {name: {**file, "dataset": "KTVIC"} for name, file in metrics().items()}
    assert "(reported)" in comparison_markdown(ktvic, MODELS)
    # A file from before datasets were recorded is KTVIC's, and agrees with any splits.
    ktvic["viclipcap"] = {**metrics()["viclipcap"]}
    ktvic["cnn_lstm"]["splits"] = "val carved out of train by image (0.1 of its images, seed 0)"
    assert "KTVIC, split `test`, 558 images (splits: val carved" in comparison_markdown(ktvic, MODELS)
    other_seed = {name: {**file, "splits": f"test carved ({name})"} for name, file in files.items()}
    with pytest.raises(ViclipError, match="disagree on splits"):
        comparison_markdown(other_seed, MODELS)


def test_bar_chart_writes_a_png(tmp_path):
    path = tmp_path / "comparison.png"
    bar_chart(metrics(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert list(tmp_path.iterdir()) == [path]


def test_failed_chart_leaves_the_old_one_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "comparison.png"
    path.write_bytes(b"old chart")

    def broken_savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"half a chart")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        bar_chart(metrics(), path)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"old chart"


def test_the_models_table_says_how_many_captions_never_stopped():
    markdown = comparison_markdown(metrics(unfinished=3), MODELS)
    assert row(markdown, "ViCLIPCap")[-1] == "3 of 558"
    assert row(markdown, "CNN+LSTM")[-1] == "not recorded"  # a metrics file from before `unfinished`


def test_word_protocol_gets_a_table_of_its_own_without_the_published_columns():
    markdown = comparison_markdown(with_words(metrics()), MODELS)
    assert markdown.index("## Syllable protocol") < markdown.index("## Word protocol") < markdown.index("## Models")
    words = read_markdown_table(markdown, "word")
    assert list(words) == ["CNN+LSTM", "ViCLIPCap"]  # published figures are syllable-level: no reported columns
    for name, column in (("cnn_lstm", "CNN+LSTM"), ("viclipcap", "ViCLIPCap")):
        assert words[column] == {k: None if v is None else round(v - 0.1, 4) for k, v in SCORES[name].items()}
    assert read_markdown_table(markdown, "syllable")["ViCLIPCap (reported)"]["cider"] == 0.8127
    assert "Segmenter: underthesea 9.5.0, function=word_tokenize, use_token_normalize=True." in markdown and "KTVIC paper" in markdown
    assert f"- SPICE (word): {SPICE_NOTE}" in markdown and f"- SPICE (syllable): {SPICE_NOTE}" in markdown


def test_a_protocol_missing_from_one_file_is_left_out_and_said(tmp_path):
    files = with_words(metrics())
    del files["cnn_lstm"]["word"]
    markdown = comparison_markdown(files, MODELS)
    assert "## Word protocol" not in markdown and "- Word protocol: not in every metrics file" in markdown
    with pytest.raises(LookupError, match="no table .* under '## Word protocol'"):
        read_markdown_table(markdown, "word")


def test_word_only_files_compare_on_words_and_chart_them(tmp_path):
    files = with_words(metrics())
    for file in files.values():
        for key in (*SCORES["cnn_lstm"], "protocol"):
            del file[key]
    markdown = comparison_markdown(files, MODELS)
    assert "## Syllable protocol" not in markdown and "## Word protocol" in markdown
    bar_chart(files, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_word_scores_from_another_segmenter_are_not_compared():
    other = {**WORD, "segmenter": {**WORD["segmenter"], "version": "6.8.4"}}
    with pytest.raises(ViclipError, match="disagree on protocol \\(word"):
        comparison_markdown(with_words(metrics(), protocol=other), MODELS)


def test_display_order_is_baseline_viclipcap_variants_then_unnamed_models_by_name():
    given = ["zeta", "viclipcap_published", "viclipcap_scst", "alpha", "viclipcap", "viclipcap_rag", "cnn_lstm"]
    assert display_order(given) == ["cnn_lstm", "viclipcap", "viclipcap_rag", "viclipcap_scst", "viclipcap_published",
                                    "alpha", "zeta"]


def test_variants_are_columns_in_display_order_whatever_the_dict_order():
    files = with_variants(metrics(), "viclipcap_lora", "viclipcap_scst", "viclipcap_rag")
    markdown = comparison_markdown(files, {**VARIANT_MODELS, **MODELS})
    runs = ["CNN+LSTM", "ViCLIPCap", "ViCLIPCap + retrieval", "ViCLIPCap + SCST", "viclipcap_lora"]
    assert header(markdown) == ["Metric", *runs, "CNN+LSTM (reported)", "ViCLIPCap (reported)"]
    assert header(markdown, "| Model |")[:4] == ["Model", "Encoder", "LM", "Setup"]
    assert [line.split(" | ")[0][2:] for line in markdown.split("## Models")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| Model")] == runs
    table = read_markdown_table(markdown)
    assert list(table)[:5] == runs
    assert table["viclipcap_lora"]["cider"] == 0.85 and table["ViCLIPCap + SCST"]["cider"] == 0.91
    assert "# CNN+LSTM vs ViCLIPCap and 3 others\n" in markdown and "5 models scored" in markdown
    assert "best of this run's 5 values" in markdown


def test_bold_marks_the_best_of_all_models_in_each_row():
    markdown = comparison_markdown(with_variants(metrics(), "viclipcap_rag", "viclipcap_scst", "viclipcap_lora"),
                                   {**MODELS, **VARIANT_MODELS})
    assert row(markdown, "CIDEr")[:5] == ["0.6100", "0.8300", "0.8800", "**0.9100**", "0.8500"]
    assert row(markdown, "BLEU-4")[:5] == ["0.2457", "0.3100", "**0.3400**", "0.3300", "0.3100"]
    # 0.5, 0.50001 and 0.50004 all print 0.5000: a three-way tie; 0.49 is not.
    assert row(markdown, "ROUGE-L")[:5] == ["**0.5000**", "**0.5000**", "**0.5000**", "**0.5000**", "0.4900"]
    assert row(markdown, "SPICE")[:5] == ["n/a"] * 5
    assert not any("**" in cell for cell in row(markdown, "CIDEr")[5:])  # reported: never bold


def test_models_table_shows_lm_training_start_and_retrieval():
    markdown = comparison_markdown(with_variants(metrics(), "viclipcap_rag", "viclipcap_scst", "viclipcap_lora"),
                                   {**MODELS, **VARIANT_MODELS})
    assert row(markdown, "CNN+LSTM")[1:3] == ["—", "—"]  # no LM, no setup
    assert row(markdown, "ViCLIPCap")[1:3] == ["frozen", "—"]
    assert row(markdown, "ViCLIPCap + SCST")[1:3] == ["frozen", "starts from ViCLIPCap"]
    assert row(markdown, "ViCLIPCap + retrieval")[1:3] == ["frozen", "retrieval k=4"]
    assert row(markdown, "viclipcap_lora")[1:3] == ["lora", "—"]


def test_a_note_all_models_share_is_said_once_else_whose():
    files = with_variants(metrics(), "viclipcap_rag", "viclipcap_scst")
    for model in ("viclipcap_rag", "viclipcap_scst"):
        files[model]["notes"] = {**files[model]["notes"], "decoding": "beam 3"}
    markdown = comparison_markdown(files, {**MODELS, **VARIANT_MODELS})
    assert markdown.count(SPICE_NOTE) == 1 and f"- SPICE (syllable): {SPICE_NOTE}" in markdown
    assert "- decoding (ViCLIPCap + retrieval; ViCLIPCap + SCST): beam 3" in markdown


def test_bar_chart_grows_with_the_models_and_stays_one_png(tmp_path):
    two, five = tmp_path / "two.png", tmp_path / "five.png"
    bar_chart(metrics(), two)
    bar_chart(with_variants(metrics(), "viclipcap_rag", "viclipcap_scst", "viclipcap_lora"), five)
    with Image.open(two) as small, Image.open(five) as large:
        assert large.format == "PNG" and 1200 <= small.width < large.width < 4000 and 400 < large.height < 1500
    assert sorted(tmp_path.iterdir()) == [five, two]


@pytest.mark.parametrize("drop, message", [
    (("cnn_lstm",), "no metrics for the baseline, cnn_lstm"),
    (("viclipcap", "viclipcap_rag"), "no model's metrics to compare cnn_lstm with"),
])
def test_a_comparison_needs_the_baseline_and_another_model(drop, message, tmp_path):
    files = with_variants(metrics(), "viclipcap_rag")
    for model in drop:
        del files[model]
    with pytest.raises(ViclipError, match=message):
        comparison_markdown(files, {**MODELS, **VARIANT_MODELS})
    with pytest.raises(ViclipError, match=message):
        bar_chart(files, tmp_path / "comparison.png")
    assert list(tmp_path.iterdir()) == []


def test_a_variant_scored_on_another_split_is_not_compared():
    files = with_variants(metrics(), "viclipcap_rag", "viclipcap_scst")
    files["viclipcap_scst"]["split"] = "val"
    with pytest.raises(ViclipError, match="disagree on split"):
        comparison_markdown(files, {**MODELS, **VARIANT_MODELS})


def test_a_model_with_metrics_but_no_model_config_is_refused():
    with pytest.raises(ViclipError, match="no model config for viclipcap_rag"):
        comparison_markdown(with_variants(metrics(), "viclipcap_rag"), MODELS)


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """A project folder with both models' metrics files and model directories (config.json alone)."""
    monkeypatch.chdir(tmp_path)
    config = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    for model, scores in metrics().items():
        paths.metrics_path(config, model).parent.mkdir(parents=True, exist_ok=True)
        paths.metrics_path(config, model).write_text(json.dumps(scores))
        paths.model_dir(config, model).mkdir(parents=True)
        spec = ModelSpec(model, registry.MODELS[model].store, registry.MODELS[model].sections(config),
                         MODELS[model]["fingerprints"], MODELS[model]["training"])
        (paths.model_dir(config, model) / "config.json").write_text(json.dumps(spec.to_json()))
    return config


def test_compare_stage_reports_the_scored_models_and_names_the_rest(scored):
    summary = compare.run(scored)  # the variants are neither trained nor scored here
    assert summary.startswith("compare: CIDEr syllable cnn_lstm 0.6100, viclipcap 0.8300 (not scored, so left out: "
                              "viclipcap_rag, viclipcap_scst, viclipcap_published) -> ")
    markdown = paths.report_path(scored).read_text()
    assert header(markdown)[:3] == ["Metric", "CNN+LSTM", "ViCLIPCap"] and paths.chart_path(scored).is_file()


def test_compare_stage_refuses_metrics_without_their_model_directory(scored):
    (paths.model_dir(scored, "viclipcap") / "config.json").unlink()
    paths.model_dir(scored, "viclipcap").rmdir()
    with pytest.raises(ViclipError, match="viclipcap.json has no model directory .* `viclip train --model viclipcap`"):
        compare.run(scored)
    assert not paths.report_path(scored).exists()
