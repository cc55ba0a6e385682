"""How often underthesea's word segmentation agrees with a reference segmentation.

    python -m benchmarks.segmentation PATH...

PATH is an annotation file in KTVIC's format (JSON, `annotations[*].segment_caption`,
the syllables of one word joined by "_") or a plain-text file holding one such
segmented sentence per line. Each reference word goes through the scoring
protocol's normalisation (pipeline.evaluation.text.protocol_text: NFC, lowercase, punctuation to
spaces); the sentence's syllables are then segmented by underthesea's
word_tokenize and the words compared by their syllable spans: a word counts as
correct when the reference has a word over exactly the same syllables.

Both settings of use_token_normalize are measured (the word protocol uses it on).
On, underthesea may re-place a tone mark ("hoà" -> "hòa"), so the reference's
syllables are passed through the same token_normalize before comparing. Left
out, and counted: a reference with punctuation inside a word ("10-9", "500.000"),
which the normalisation splits into syllables the reference never separated, and
a sentence whose syllables underthesea's output still does not reproduce.

Segments with the word protocol's own function (pipeline.evaluation.protocols.words). Prints
figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from pipeline.evaluation.protocols import words
from pipeline.evaluation.text import protocol_text

Words = list[list[str]]  # a sentence: its words, each a list of syllables


def references(path: Path) -> list[str]:
    """The segmented sentences in an annotation file or a plain-text file."""
    if path.suffix == ".json":
        return [ann["segment_caption"] for ann in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference_words(segmented: str) -> Words | None:
    """A "_"-segmented sentence as normalised words, punctuation-only words dropped; None when
    punctuation sits inside a syllable of a word."""
    words = []
    for token in segmented.split():
        pieces = [protocol_text(piece).split() for piece in token.split("_")]
        if any(len(piece) > 1 for piece in pieces):
            return None
        if word := [syllable for piece in pieces for syllable in piece]:
            words.append(word)
    return words


def syllables(words: Words) -> list[str]:
    return [syllable for word in words for syllable in word]


def underthesea_words(syllables: list[str], token_normalize: bool) -> Words:
    """The word protocol's segmentation of a sentence, with underthesea's tone-mark normalisation on or off."""
    return [word.split("_") for word in words(" ".join(syllables), token_normalize).split()]


def token_normalized(words: Words) -> Words:
    """The words with each syllable spelled as underthesea's token_normalize spells it."""
    from underthesea.pipeline.text_normalize import token_normalize

    return [[token_normalize(syllable) for syllable in word] for word in words]


def spans(words: Words) -> list[tuple[int, int]]:
    """Each word's [start, end) in syllables."""
    out, start = [], 0
    for word in words:
        out.append((start, start + len(word)))
        start += len(word)
    return out


def _joined(syllables: list[str], cuts: set[int], lo: int, hi: int) -> str:
    """syllables[lo:hi] as "_"-joined words, cut at `cuts`."""
    edges = [lo, *sorted(c for c in cuts if lo < c < hi), hi]
    return " ".join("_".join(syllables[a:b]) for a, b in zip(edges, edges[1:]))


def disagreements(ref: Words, hyp: Words) -> list[tuple[str, str]]:
    """The stretches where the two segmentations differ, cut at the word boundaries they share."""
    text = syllables(ref)
    ref_cuts = {end for _, end in spans(ref)}
    hyp_cuts = {end for _, end in spans(hyp)}
    out, lo = [], 0
    for hi in sorted(ref_cuts & hyp_cuts):
        ref_part, hyp_part = _joined(text, ref_cuts, lo, hi), _joined(text, hyp_cuts, lo, hi)
        if ref_part != hyp_part:
            out.append((ref_part, hyp_part))
        lo = hi
    return out


@dataclass
class Tally:
    sentences: int = 0  # compared
    identical: int = 0
    changed: int = 0  # left out: underthesea's output has other syllables
    ref_words: int = 0
    hyp_words: int = 0
    matching: int = 0
    patterns: Counter = field(default_factory=Counter)  # (reference, underthesea) stretches
    examples: list[tuple[str, str]] = field(default_factory=list)  # whole sentences

    def add(self, ref: Words, hyp: Words) -> None:
        if syllables(hyp) != syllables(ref):
            self.changed += 1
            return
        ref_spans, hyp_spans = set(spans(ref)), set(spans(hyp))
        self.sentences += 1
        self.identical += ref_spans == hyp_spans
        self.ref_words += len(ref_spans)
        self.hyp_words += len(hyp_spans)
        self.matching += len(ref_spans & hyp_spans)
        if ref_spans != hyp_spans:
            self.patterns.update(disagreements(ref, hyp))
            self.examples.append((" ".join(map("_".join, ref)), " ".join(map("_".join, hyp))))

    def report(self) -> str:
        p, r = self.matching / self.hyp_words, self.matching / self.ref_words
        return (f"    {self.sentences:,} sentences compared ({self.changed:,} left out: underthesea changed "
                f"their syllables)\n"
                f"    identical segmentation: {self.identical:,} ({self.identical / self.sentences:.1%})\n"
                f"    words: reference {self.ref_words:,}, underthesea {self.hyp_words:,}, "
                f"matching {self.matching:,}\n"
                f"    precision {p:.2%}  recall {r:.2%}  F1 {2 * p * r / (p + r):.2%}")


def measure(refs: list[Words], token_normalize: bool, examples: int) -> None:
    if token_normalize:
        normalized = [token_normalized(ref) for ref in refs]
        respelled = sum(new != old for new, old in zip(normalized, refs))
        refs = normalized
    tally = Tally()
    for ref in refs:
        tally.add(ref, underthesea_words(syllables(ref), token_normalize))
    print(f"  use_token_normalize={token_normalize}"
          + (f" ({respelled:,} references re-spelled by token_normalize to match)" if token_normalize else ""))
    print(tally.report())
    if examples:
        print("    most frequent disagreements (reference -> underthesea, times):")
        for (ref, hyp), n in tally.patterns.most_common(examples):
            print(f"      {ref}  ->  {hyp}  ({n})")
        print("    first disagreeing sentences (reference, then underthesea):")
        for ref, hyp in tally.examples[:examples]:
            print(f"      {ref}\n      {hyp}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument("--examples", type=int, default=12, help="disagreements to print (default 12; 0: none)")
    args = parser.parse_args()

    print(f"underthesea {version('underthesea')}: word_tokenize(text, format='text', use_token_normalize=...)")
    for path in args.paths:
        parsed = [reference_words(text) for text in references(path)]
        refs = [words for words in parsed if words]
        print(f"\n{path}: {len(parsed):,} references, {len(refs):,} used "
              f"({parsed.count(None):,} left out: punctuation inside a word; "
              f"{len(parsed) - len(refs) - parsed.count(None):,} empty)")
        measure(refs, token_normalize=False, examples=args.examples)
        measure(refs, token_normalize=True, examples=0)


if __name__ == "__main__":
    main()
