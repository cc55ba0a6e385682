"""The scoring protocol's text normalisation, shared by the scorer and the baseline's vocabulary.

Kept apart from the scorer, so that a change to how captions are scored is not
a change to the baseline's training data (and DVC sees the difference).
"""

from __future__ import annotations

import unicodedata


def protocol_text(text: str) -> str:
    """The protocol's tokenisation: NFC, lowercase, punctuation stripped, syllables joined by single spaces.

    Not the captions' own text (`pipeline.data.annotations.caption_text`), which keeps punctuation for the LM."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())
