"""The CNN+LSTM baseline: a training-only vocabulary, a frozen CNN, the same scorer path as ViCLIPCap,
and a comparison table that says exactly what the metrics files say."""

from __future__ import annotations

import json
from contextlib import chdir

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core import paths, registry
from pipeline.core.config import load_config
from pipeline.core.errors import ViclipError
from pipeline.data.datasets import load_splits
from pipeline.encoders.cnn import load_cnn
from pipeline.evaluation import metrics
from pipeline.evaluation.report import display_name
from pipeline.evaluation.text import protocol_text
from pipeline.models.cnn_lstm import END, SPECIALS, UNK, Vocabulary
from tests.conftest import invoke
from stages import score
from tests.report_tables import read_markdown_table

CPU = torch.device("cpu")


def test_vocabulary_keeps_syllables_seen_min_count_times():
    vocab = Vocabulary.build(["Một con mèo.", "một con chó", "MỘT con mèo"], min_count=2)
    assert vocab.tokens == (*SPECIALS, "con", "một", "mèo")
    encoded = vocab.encode(["con chó mèo"])[0]
    assert encoded[1] == UNK and encoded[-1] == END
    assert vocab.decode(encoded) == "con mèo"


def test_vocabulary_round_trips_and_refuses_other_files(tmp_path):
    vocab = Vocabulary.build(["một hai ba", "một hai"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    (tmp_path / "other.json").write_text(json.dumps({"tokens": ["a"]}))
    with pytest.raises(ViclipError, match="other.json: not a viclip vocabulary"):
        Vocabulary.load(tmp_path / "other.json")


def test_the_trained_vocabulary_comes_from_training_captions_only(project):
    # A syllable that only test captions use, many times over: it must not enter the vocabulary.
    path = project / "ktvic/test_data.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    for annotation in raw["annotations"]:
        annotation["caption"] += " kỳlân"
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    for args in (["extract", "--store", "cnn"], ["train", "--model", "cnn_lstm"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output

    config = load_config("params.yaml")
    vocab = Vocabulary.load(project / "artifacts/models/cnn_lstm/vocab.json")
    splits = load_splits(config.data)
    counts: dict[str, int] = {}
    for caption in (c for r in splits["train"] for c in r.captions):
        for syllable in protocol_text(caption).split():
            counts[syllable] = counts.get(syllable, 0) + 1
    assert set(vocab.tokens) - set(SPECIALS) == {s for s, n in counts.items() if n >= config.lstm.min_count}
    assert "kỳlân" not in vocab.tokens


def test_the_cnn_is_frozen_and_never_saved(demo, config):
    with chdir(demo):
        encoder = load_cnn(config.cnn, CPU)
    trunk = encoder.trunk
    assert not trunk.training and not any(p.requires_grad for p in trunk.parameters())
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    pixels = torch.randn(4, 3, config.cnn.image_size, config.cnn.image_size) * 3
    first = encoder(pixels)
    # eval mode: batch-norm running statistics do not move, so the same pixels give the same features
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())
    assert torch.equal(first, encoder(pixels))
    assert first.shape == (4, config.cnn.grid**2, 512)

    saved = load_file(str(demo / "artifacts/models/cnn_lstm/decoder.safetensors"))
    assert not set(saved) & {f"trunk.{k}" for k in before} and not any(k.startswith(("layer", "conv1", "bn1")) for k in saved)


def test_both_models_are_scored_by_the_same_call(demo, config, monkeypatch, tmp_path):
    calls = []
    real = metrics.score_tokenized

    def spy(gts, res):
        calls.append((gts, res))
        return real(gts, res)

    monkeypatch.setattr(metrics, "score_tokenized", spy)
    rescored = config.model_copy(update={"score": config.score.model_copy(update={"out": str(tmp_path)})})
    with chdir(demo):
        for model in registry.MODELS:
            fresh, _ = score.run(rescored, model)
            stored = json.loads(paths.metrics_path(config, model).read_text())
            assert fresh == stored  # decoding is deterministic, so the pipeline's file is this call's result
    # Per model, one call per protocol (syllable, then word): the same references, tokenised the same way.
    assert len(calls) == 2 * len(registry.MODELS)
    assert all(gts == calls[i % 2][0] for i, (gts, _) in enumerate(calls))
    assert calls[0][0] != calls[1][0] and any("_" in ref for refs in calls[1][0].values() for ref in refs)


def test_the_comparison_tables_say_what_the_metrics_files_say(demo):
    markdown = (demo / "artifacts/report/comparison.md").read_text()
    for protocol in ("syllable", "word"):
        table = read_markdown_table(markdown, protocol)
        for model, name in ((m, display_name(m)) for m in registry.MODELS):
            scores = json.loads((demo / f"artifacts/metrics/{model}.json").read_text())
            scores = scores if protocol == "syllable" else scores["word"]
            assert table[name] == {k: None if scores[k] is None else round(scores[k], 4) for k in table[name]}
    assert (demo / "artifacts/report/comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_on_word_only_metrics_files(demo_copy, monkeypatch):
    for model in registry.MODELS:  # as `score.protocol: word` writes them: no syllable figures at the top level
        path = demo_copy / f"artifacts/metrics/{model}.json"
        scores = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in scores.items() if k not in metrics.METRICS and k != "protocol"}))
    monkeypatch.chdir(demo_copy)
    result = invoke("compare")
    assert result.exit_code == 0, result.output
    assert "compare: CIDEr word cnn_lstm" in result.output
    markdown = (demo_copy / "artifacts/report/comparison.md").read_text()
    assert "## Word protocol" in markdown and "## Syllable protocol" not in markdown
