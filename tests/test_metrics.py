"""The scorer: its protocol, and that it returns exactly what pycocoevalcap returns."""

from __future__ import annotations

import unicodedata

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.errors import ViclipError
from pipeline.metrics import score_captions
from pipeline.text import tokenize

REFERENCES = {
    1: ["Một con mèo đang nằm trên ghế.", "con mèo nằm ngủ trên chiếc ghế", "một chú mèo trên ghế sofa",
        "con mèo màu cam nằm trên ghế", "một con mèo đang ngủ"],
    2: ["hai người đang đi bộ trên phố", "hai người đàn ông đi trên đường phố", "người đi bộ trên vỉa hè",
        "hai người đi dạo trên phố đông", "những người đang đi trên đường"],
    3: ["một bát phở bò trên bàn", "bát phở nóng đặt trên bàn gỗ", "một tô phở trên bàn",
        "phở bò và rau thơm trên bàn", "bát phở trên mặt bàn"],
}
PREDICTIONS = {1: "một con mèo nằm trên ghế", 2: "Hai người đi trên đường phố!", 3: "một bát phở trên bàn gỗ"}


def test_tokenisation_is_nfc_lowercase_without_punctuation():
    nfd = unicodedata.normalize("NFD", "Một con MÈO, đang ngủ.")
    assert tokenize(nfd) == "một con mèo đang ngủ"
    assert tokenize(nfd) == unicodedata.normalize("NFC", tokenize(nfd))


def test_wrapper_returns_what_pycocoevalcap_returns(monkeypatch):
    gts = {i: [tokenize(r) for r in refs] for i, refs in REFERENCES.items()}
    res = {i: [tokenize(p)] for i, p in PREDICTIONS.items()}
    # The wrapper runs METEOR's jar with UTF-8 input whatever the locale; the direct call does too.
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Dfile.encoding=UTF-8 -Dstdin.encoding=UTF-8")
    direct = dict(zip(("bleu_1", "bleu_2", "bleu_3", "bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    direct["rouge_l"] = Rouge().compute_score(gts, res)[0]
    direct["cider"] = Cider().compute_score(gts, res)[0]
    direct["meteor"] = Meteor().compute_score(gts, res)[0]

    scores, notes = score_captions(REFERENCES, PREDICTIONS)
    assert {k: scores[k] for k in direct} == direct
    assert 0 < scores["bleu_4"] < scores["bleu_1"] < 1 and scores["cider"] > 0
    assert scores["spice"] is not None or "spice" in notes


def test_perfect_captions_score_one_on_bleu_and_rouge():
    scores, _ = score_captions(REFERENCES, {i: refs[0] for i, refs in REFERENCES.items()})
    assert scores["bleu_4"] == pytest.approx(1.0) and scores["rouge_l"] == pytest.approx(1.0)


@pytest.mark.parametrize("predictions, message", [
    ({**PREDICTIONS, 99: "x"}, "unknown image ids: 99"),
    ({1: "x", 2: "y"}, "no caption for 1 test images: 3"),
])
def test_unknown_or_missing_ids_are_refused(predictions, message):
    with pytest.raises(ViclipError, match=message):
        score_captions(REFERENCES, predictions)
