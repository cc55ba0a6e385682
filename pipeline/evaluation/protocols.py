"""The two ways Vietnamese captions are counted when they are scored.

`syllable`: whitespace syllables, as KTVIC's `caption` field is written and as ViCLIPCap
scored. `word`: the same text segmented into words by underthesea, syllables of one word
joined by "_", as the KTVIC paper and most Vietnamese captioning work score. References
and candidates always go through the same segmenter: KTVIC's own `segment_caption` came
from another one (RDRSegmenter), and mixing the two would bias the scores.

Kept out of `pipeline.evaluation.text`, which the baseline's vocabulary also reads: a change here is
a change to scoring only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from typing import Any

from pipeline.evaluation.text import protocol_text

NAMES = ("syllable", "word")
SETTINGS = (*NAMES, "both")  # score.protocol

# Recorded in every metrics file, and compared when files are put side by side: kept as first written, so files
# scored before the runner moved to pipeline.evaluation.spice still compare with new ones.
SCORERS = "pycocoevalcap 1.2: BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D; SPICE 1.0 run directly (pipeline.spice)"
# underthesea's default, pinned: it moves tone marks to one placement ("hoà" -> "hòa"), so two
# spellings of one syllable count as one, in references and candidates alike.
TOKEN_NORMALIZE = True


@dataclass(frozen=True)
class Protocol:
    name: str
    tokenize: Callable[[str], str]  # a caption -> its tokens, joined by single spaces
    description: Callable[[], dict[str, Any]]  # what the metrics file records


def _syllable_description() -> dict[str, Any]:
    return {"tokenisation": "NFC, lowercase, punctuation stripped, whitespace-split syllables (no PTB tokenizer)",
            "scorers": SCORERS}


@cache
def _word_tokenize() -> Callable[..., str]:
    from underthesea import word_tokenize  # loads its CRF model: only when the word protocol is used

    return word_tokenize


def words(text: str, token_normalize: bool = TOKEN_NORMALIZE) -> str:
    """The syllable protocol's tokens, segmented into words; a word's syllables joined by "_"."""
    return _word_tokenize()(protocol_text(text), format="text", use_token_normalize=token_normalize)


def segmenter() -> dict[str, Any]:
    return {"name": "underthesea", "version": version("underthesea"), "function": "word_tokenize",
            "use_token_normalize": TOKEN_NORMALIZE}


def _word_description() -> dict[str, Any]:
    return {"tokenisation": "the syllable protocol's text, segmented into words by underthesea's word_tokenize "
                            "(CRF), syllables of a word joined by \"_\"",
            "segmenter": segmenter(), "scorers": SCORERS}


PROTOCOLS = {
    "syllable": Protocol("syllable", protocol_text, _syllable_description),
    "word": Protocol("word", words, _word_description),
}


def chosen(setting: str) -> list[Protocol]:
    """The protocols a `score.protocol` setting names, syllable first."""
    return [PROTOCOLS[name] for name in (NAMES if setting == "both" else (setting,))]
