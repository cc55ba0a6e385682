"""Caption metrics under the stated protocols, for every model and every results file.

Each protocol (pipeline.evaluation.protocols: syllables, or underthesea's words) tokenises references
and candidates alike; then the raw pycocoevalcap 1.2 scorers run, without the English PTB
tokenizer, and SPICE runs directly on the JVM (pipeline.evaluation.spice). CIDEr's IDF comes from the
references being scored, so a score belongs to the whole split scored.

A metrics file keeps the syllable figures at its top level (as `dvc metrics` and older
readers expect) and the word figures in a nested `word` block; `blocks` reads them back.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from pipeline.core.errors import ViclipError
from pipeline.evaluation.protocols import PROTOCOLS, Protocol
from pipeline.evaluation.spice import SpiceFailed, error_line, spice

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")
SYLLABLE_ONLY = (PROTOCOLS["syllable"],)


def _quiet(scorer: Any, gts: dict, res: dict) -> Any:
    # pycocoevalcap prints progress to stdout; keep ours clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return scorer.compute_score(gts, res)[0]


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
    scores["meteor"], notes_meteor = _meteor(gts, res)
    try:
        scores["spice"], notes_spice = spice(gts, res), None
    except SpiceFailed as failure:
        scores["spice"], notes_spice = None, str(failure)
    notes.update({k: v for k, v in (("meteor", notes_meteor), ("spice", notes_spice)) if v})
    return {name: scores[name] for name in METRICS}, notes


@cache
def _meteor_jar() -> Any:
    """METEOR's JVM, started once per process: it takes seconds to load, and each protocol scores with it."""
    from pycocoevalcap.meteor.meteor import Meteor

    # Java 17 reads stdin in the locale's charset; Vietnamese needs UTF-8 whatever the locale.
    saved = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = "-Dfile.encoding=UTF-8 -Dstdin.encoding=UTF-8"
    try:
        return Meteor()
    finally:
        if saved is None:
            del os.environ["JAVA_TOOL_OPTIONS"]
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = saved


def _meteor(gts: dict, res: dict) -> tuple[float | None, str | None]:
    if shutil.which("java") is None:
        return None, "METEOR runs a Java jar and no `java` is on PATH"
    try:
        meteor = _meteor_jar()
    except OSError as error:
        return None, f"METEOR's jar did not start ({error})"
    try:
        return float(_quiet(meteor, gts, res)), None
    except (OSError, ValueError):  # the jar died: its pipe broke or went silent
        _meteor_jar.cache_clear()
        # The wrapper keeps its lock on an error, and its __del__ waits for that lock: free it, or
        # collecting the wrapper hangs the process.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        said = meteor.meteor_p.stderr.read().decode(errors="replace")
        return None, f"METEOR's jar stopped answering: {error_line(said)}"


def score_captions(
    references: Mapping[int, list[str]],
    predictions: Mapping[int, str],
    protocols: Sequence[Protocol] = SYLLABLE_ONLY,
    source: str = "captions",
) -> dict[str, dict[str, Any]]:
    """Score one caption per image against its references under each protocol:
    {protocol name: {metric: value, "protocol": what was done, "notes": why a metric is None}}."""
    unknown = sorted(set(predictions) - set(references))
    missing = sorted(set(references) - set(predictions))
    if unknown:
        raise ViclipError(f"{source}: {len(unknown)} unknown image ids: {_listing(unknown)}")
    if missing:
        raise ViclipError(f"{source}: no caption for {len(missing)} test images: {_listing(missing)}")
    by_protocol = {}
    for protocol in protocols:
        gts = {i: [protocol.tokenize(r) for r in references[i]] for i in references}
        res = {i: [protocol.tokenize(predictions[i])] for i in references}
        scores, notes = score_tokenized(gts, res)
        by_protocol[protocol.name] = {**scores, "protocol": {"name": protocol.name, **protocol.description()},
                                      "notes": notes}
    return by_protocol


def laid_out(by_protocol: Mapping[str, Mapping[str, Any]], **run: Any) -> dict[str, Any]:
    """One metrics file: the syllable figures, the run's fields, the syllable protocol and notes at the
    top level, the word block nested. A `notes` entry in `run` (about the run, not a metric) joins the
    top-level notes."""
    syllable = dict(by_protocol.get("syllable", {}))
    protocol, notes = syllable.pop("protocol", None), syllable.pop("notes", {})
    top: dict[str, Any] = {**syllable, **run}
    if protocol is not None:
        top["protocol"] = protocol
    top["notes"] = {**notes, **run.get("notes", {})}
    if "word" in by_protocol:
        top["word"] = dict(by_protocol["word"])
    return top


def blocks(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each protocol's figures in a metrics file, by protocol name (files from before the word
    protocol hold syllable figures alone, at the top level)."""
    found: dict[str, Mapping[str, Any]] = {}
    if any(metrics.get(m) is not None for m in METRICS) or "protocol" in metrics:
        found["syllable"] = metrics
    if isinstance(metrics.get("word"), Mapping):
        found["word"] = metrics["word"]
    return found


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


def shared_protocols(files: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict[str, Mapping[str, Any]]], list[str]]:
    """The protocols every metrics file in `files` holds ({protocol: {file: its block}}), and those only
    some hold. Refuses files that describe a shared protocol differently (another segmenter version, say)."""
    found = {name: blocks(metrics) for name, metrics in files.items()}
    shared: dict[str, dict[str, Mapping[str, Any]]] = {}
    for protocol in PROTOCOLS:
        if not all(protocol in held for held in found.values()):
            continue
        described = {repr(held[protocol].get("protocol")) for held in found.values()}
        if len(described) > 1:
            raise ViclipError(
                f"comparison: the metrics files disagree on protocol ({protocol}: {' vs '.join(sorted(described))}); "
                "scores under different protocols are not comparable"
            )
        shared[protocol] = {name: held[protocol] for name, held in found.items()}
    unshared = [p for p in PROTOCOLS if p not in shared and any(p in held for held in found.values())]
    return shared, unshared


def format_tables(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One labelled table per protocol that every metrics file in `files` holds, one column per file."""
    shared, unshared = shared_protocols(files)
    parts = []
    for protocol, held in shared.items():
        description = next(iter(held.values())).get("protocol") or {}
        parts.append(f"{protocol} protocol: {description.get('tokenisation', 'not recorded')}\n{format_table(held)}")
    parts += [f"{protocol} protocol: not in every metrics file, so not shown" for protocol in unshared]
    return "\n\n".join(parts) or "no scoring protocol is in every metrics file"
