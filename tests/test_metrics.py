"""The scorer: its protocols, that it returns exactly what pycocoevalcap returns, and the metrics file's layout."""

from __future__ import annotations

import unicodedata
from typing import get_args

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.core.config import ScoreConfig
from pipeline.core.errors import ViclipError
from pipeline.evaluation.metrics import blocks, format_tables, laid_out, score_captions
from pipeline.evaluation.protocols import SETTINGS, chosen, words
from pipeline.evaluation.text import protocol_text

REFERENCES = {
    1: ["Một con mèo đang nằm trên ghế.", "con mèo nằm ngủ trên chiếc ghế", "một chú mèo trên ghế sofa",
        "con mèo màu cam nằm trên ghế", "một con mèo đang ngủ"],
    2: ["hai người đang đi bộ trên phố", "hai người đàn ông đi trên đường phố", "người đi bộ trên vỉa hè",
        "hai người đi dạo trên phố đông", "những người đang đi trên đường"],
    3: ["một bát phở bò trên bàn", "bát phở nóng đặt trên bàn gỗ", "một tô phở trên bàn",
        "phở bò và rau thơm trên bàn", "bát phở trên mặt bàn"],
}
PREDICTIONS = {1: "một con mèo nằm trên ghế", 2: "Hai người đi trên đường phố!", 3: "một bát phở trên bàn gỗ"}
# As vieCap4H gives them: one reference for most images, a few for some.
FEW_REFERENCES = {1: REFERENCES[1][:1], 2: REFERENCES[2][:3], 3: REFERENCES[3][:1]}


def test_tokenisation_is_nfc_lowercase_without_punctuation():
    nfd = unicodedata.normalize("NFD", "Một con MÈO, đang ngủ.")
    assert protocol_text(nfd) == "một con mèo đang ngủ"
    assert protocol_text(nfd) == unicodedata.normalize("NFC", protocol_text(nfd))


@pytest.fixture(scope="module")
def meteor() -> Meteor:
    """pycocoevalcap's own METEOR, one JVM for the module: each takes seconds to load its tables."""
    with pytest.MonkeyPatch.context() as patch:
        # The wrapper runs METEOR's jar with UTF-8 input whatever the locale; the direct call does too.
        patch.setenv("JAVA_TOOL_OPTIONS", "-Dfile.encoding=UTF-8 -Dstdin.encoding=UTF-8")
        return Meteor()


@pytest.mark.parametrize("references", [REFERENCES, FEW_REFERENCES], ids=["five", "one to three"])
def test_wrapper_returns_what_pycocoevalcap_returns(meteor, references):
    gts = {i: [protocol_text(r) for r in refs] for i, refs in references.items()}
    res = {i: [protocol_text(p)] for i, p in PREDICTIONS.items()}
    direct = dict(zip(("bleu_1", "bleu_2", "bleu_3", "bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    direct["rouge_l"] = Rouge().compute_score(gts, res)[0]
    direct["cider"] = Cider().compute_score(gts, res)[0]
    direct["meteor"] = meteor.compute_score(gts, res)[0]

    scores = score_captions(references, PREDICTIONS)["syllable"]
    assert {k: scores[k] for k in direct} == direct
    assert 0 < scores["bleu_4"] < scores["bleu_1"] < 1 and scores["cider"] > 0
    assert scores["spice"] is not None or "spice" in scores["notes"]


def test_perfect_captions_score_one_on_bleu_and_rouge():
    scores = score_captions(REFERENCES, {i: refs[0] for i, refs in REFERENCES.items()}, chosen("both"))
    for block in scores.values():
        assert block["bleu_4"] == pytest.approx(1.0) and block["rouge_l"] == pytest.approx(1.0)


@pytest.mark.parametrize("sentence, segmented", [
    ("Học sinh đi xe máy dưới bầu trời xanh.", "học_sinh đi xe_máy dưới bầu_trời xanh"),
    ("một người đàn ông đứng trên vỉa hè", "một người đàn_ông đứng trên vỉa_hè"),
    ("Nhiều người đang ngồi ăn uống trong nhà hàng", "nhiều người đang ngồi ăn_uống trong nhà_hàng"),
])
def test_word_protocol_joins_the_syllables_of_a_word(sentence, segmented):
    assert words(sentence) == segmented
    assert words(unicodedata.normalize("NFD", sentence)) == segmented  # NFC first, as the syllable protocol


def test_word_protocol_places_tone_marks_one_way():
    # Old- and new-style tone placement ("hoà"/"hòa", "thuỷ"/"thủy") are one syllable to the word protocol.
    assert words("hoà bình") == words("hòa bình") and words("thuỷ thủ") == words("thủy thủ")
    assert words("") == ""


def test_word_protocol_scores_words_not_syllables():
    refs = {1: ["học sinh đi học"] * 5}
    # The same syllables, but other words: "sinh_học đi_học" (study biology) against "học_sinh đi học".
    by_protocol = score_captions(refs, {1: "sinh học đi học"}, chosen("both"))
    assert words("sinh học đi học") == "sinh_học đi_học"
    assert by_protocol["syllable"]["bleu_1"] == pytest.approx(1.0)
    assert by_protocol["word"]["bleu_1"] == pytest.approx(0.0, abs=1e-9)  # not one word in common


@pytest.fixture(scope="module")
def scored() -> dict:
    return score_captions(REFERENCES, PREDICTIONS, chosen("both"))


def test_the_params_setting_and_the_protocols_agree():
    assert get_args(ScoreConfig.model_fields["protocol"].annotation) == SETTINGS


def test_each_protocol_describes_itself_and_the_segmenter_is_pinned(scored):
    assert list(scored) == ["syllable", "word"]
    assert scored["syllable"]["protocol"]["name"] == "syllable" and "segmenter" not in scored["syllable"]["protocol"]
    segmenter = scored["word"]["protocol"]["segmenter"]
    assert segmenter == {"name": "underthesea", "version": "9.5.0", "function": "word_tokenize",
                         "use_token_normalize": True}
    assert [p.name for p in chosen("word")] == ["word"] and [p.name for p in chosen("syllable")] == ["syllable"]


def test_metrics_file_keeps_syllables_on_top_and_words_nested(scored):
    laid = laid_out(scored, model="m", split="test", images=3, notes={"max_length": "capped"})
    assert laid["cider"] == scored["syllable"]["cider"] and laid["protocol"]["name"] == "syllable"
    assert laid["word"]["cider"] == scored["word"]["cider"] and laid["word"]["protocol"]["name"] == "word"
    assert laid["notes"]["max_length"] == "capped" and "max_length" not in laid["word"]["notes"]
    assert {name: block["cider"] for name, block in blocks(laid).items()} == {
        name: block["cider"] for name, block in scored.items()}

    word_only = laid_out({"word": scored["word"]}, model="m", split="test", images=3)
    assert "cider" not in word_only and list(blocks(word_only)) == ["word"]
    old = {"cider": 0.5, "protocol": {"tokenisation": "syllables"}, "notes": {}}  # a file from before the word protocol
    assert list(blocks(old)) == ["syllable"]


def test_tables_are_labelled_by_protocol(scored):
    laid = laid_out(scored, model="m", split="test", images=3)
    text = format_tables({"m": laid, "n": laid})
    assert text.index("syllable protocol: NFC") < text.index("word protocol: the syllable protocol's text")
    assert text.count("cider") == 2 and text.count(f"{laid['word']['cider']:.4f}") == 2
    word_only = laid_out({"word": scored["word"]}, model="w", split="test", images=3)
    assert "syllable protocol: not in every metrics file" in format_tables({"m": laid, "w": word_only})


@pytest.mark.parametrize("predictions, message", [
    ({**PREDICTIONS, 99: "x"}, "unknown image ids: 99"),
    ({1: "x", 2: "y"}, "no caption for 1 test images: 3"),
])
def test_unknown_or_missing_ids_are_refused(predictions, message):
    with pytest.raises(ViclipError, match=message):
        score_captions(REFERENCES, predictions)
