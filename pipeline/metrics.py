"""Caption metrics under one stated protocol, for every model and every results file.

Protocol: Unicode NFC, lowercase, punctuation stripped, split on whitespace
(syllables, as KTVIC's `caption` field is written); then the raw pycocoevalcap
1.2 scorers, without the English PTB tokenizer. CIDEr's IDF comes from the
references being scored, so a score belongs to the whole split scored.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ViclipError
from pipeline.text import tokenize

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")

PROTOCOL = {
    "tokenisation": "NFC, lowercase, punctuation stripped, whitespace-split syllables (no PTB tokenizer)",
    "scorers": "pycocoevalcap 1.2: BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, SPICE 1.0",
}


def _quiet(scorer: Any, gts: dict, res: dict) -> Any:
    # pycocoevalcap prints progress to stdout; keep ours clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return scorer.compute_score(gts, res)[0]


def spice_jars_missing() -> str | None:
    """Why SPICE can't run here, or None if its Stanford CoreNLP jars are in place."""
    from pycocoevalcap import spice

    lib = Path(spice.__file__).parent / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    absent = [p.name for p in needed if not p.is_file()]
    if absent:
        return f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(absent)}) in {lib}; it is downloaded on first use and cannot be fetched offline"
    return None


def score_tokenized(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Scores of already-tokenised captions, and the reason for any metric left None."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    bleu = _quiet(Bleu(4), gts, res)
    scores.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    scores["rouge_l"] = float(_quiet(Rouge(), gts, res))
    scores["cider"] = float(_quiet(Cider(), gts, res))
    scores["meteor"], notes_meteor = _java_metric("meteor", gts, res)
    scores["spice"], notes_spice = _java_metric("spice", gts, res)
    notes.update({k: v for k, v in (("meteor", notes_meteor), ("spice", notes_spice)) if v})
    return {name: scores[name] for name in METRICS}, notes


def _java_metric(name: str, gts: dict, res: dict) -> tuple[float | None, str | None]:
    if shutil.which("java") is None:
        return None, f"{name.upper()} runs a Java jar and no `java` is on PATH"
    if name == "spice":
        missing = spice_jars_missing()
        if missing:
            return None, missing
        from pycocoevalcap.spice.spice import Spice as scorer
    else:
        from pycocoevalcap.meteor.meteor import Meteor as scorer
    # Java 17 reads stdin in the locale's charset; Vietnamese needs UTF-8 whatever the locale.
    saved = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = "-Dfile.encoding=UTF-8 -Dstdin.encoding=UTF-8"
    try:
        return float(_quiet(scorer(), gts, res)), None
    finally:
        if saved is None:
            del os.environ["JAVA_TOOL_OPTIONS"]
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = saved


def score_captions(
    references: Mapping[int, list[str]], predictions: Mapping[int, str], source: str = "captions"
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Score one caption per image against its references, under the protocol above."""
    unknown = sorted(set(predictions) - set(references))
    missing = sorted(set(references) - set(predictions))
    if unknown:
        raise ViclipError(f"{source}: {len(unknown)} unknown image ids: {_listing(unknown)}")
    if missing:
        raise ViclipError(f"{source}: no caption for {len(missing)} test images: {_listing(missing)}")
    gts = {i: [tokenize(r) for r in references[i]] for i in references}
    res = {i: [tokenize(predictions[i])] for i in references}
    return score_tokenized(gts, res)


def _listing(ids: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def format_table(columns: Mapping[str, Mapping[str, float | None]]) -> str:
    """A plain-text table: one row per metric, one column per system."""
    names = list(columns)
    lines = [f"{'metric':<8} " + " ".join(f"{n:>12}" for n in names)]
    for metric in METRICS:
        cells = [columns[n].get(metric) for n in names]
        lines.append(f"{metric:<8} " + " ".join(f"{'n/a' if c is None else f'{c:.4f}':>12}" for c in cells))
    return "\n".join(lines)
