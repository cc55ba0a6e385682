"""The comparison report: the CNN+LSTM baseline, ViCLIPCap and its variants side by side.

It lays this run's scores out in the ViCLIPCap paper's table layout, next to the
figures that paper published, so a reader sees at a glance what this reproduction
got and what was claimed. It has one table per scoring protocol the metrics files
share (syllables, words: pipeline.evaluation.protocols); the published figures sit in the
syllable table, the protocol they were scored under. Runs are only put side by side
when their metrics files were scored on the same split, the same images and under the
same protocol; anything else would compare numbers that mean different things.

It takes whichever models it is given (at least the baseline and one other), always
in the order of DISPLAY, so a model keeps its column and its colour from run to run.

Inputs are plain dicts (a metrics JSON and a model directory's config.json per
model name); the stage reads the files and writes what these functions return.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ViclipError
from pipeline.core.io import atomic_path
from pipeline.core.registry import MODELS
from pipeline.evaluation.metrics import METRICS, shared_protocols

Scores = Mapping[str, float | None]

# Metric key and display label, in the order of the published table.
ROWS: tuple[tuple[str, str], ...] = (
    ("bleu_4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("cider", "CIDEr"),
    ("meteor", "METEOR"),
    ("spice", "SPICE"),
    ("bleu_1", "BLEU-1"),
    ("bleu_2", "BLEU-2"),
    ("bleu_3", "BLEU-3"),
)

BASELINE = "cnn_lstm"  # every comparison has it, in its first column

# Model name (as in the metrics files and model directories) -> display name, in the registry's order:
# the baseline, ViCLIPCap, then ViCLIPCap's variants. A model not registered is shown under its own name,
# after these. The order also fixes each model's chart colour.
DISPLAY: dict[str, str] = {name: model.title for name, model in MODELS.items()}

# The ViCLIPCap paper's KTVIC test results, copied, never re-run. Caveats found in
# its public code: the "CNN+LSTM" column really came from an EfficientNetV2-S
# encoder with a Transformer decoder; ViCLIPCap itself ran CLIP ViT-B/16 (not
# ViT-B/32) with the GPT-2 (imthanhlv/gpt2news) fine-tuned, not frozen. Scored with
# the raw pycocoevalcap scorers on lowercase whitespace-split syllables, no PTB
# tokenizer. The paper gives BLEU-1..3 for ViCLIPCap only.
REPORTED: dict[str, dict[str, float]] = {
    "cnn_lstm": {"bleu_4": 0.2572, "rouge_l": 0.4895, "cider": 0.6282, "meteor": 0.2995, "spice": 0.0782},
    "viclipcap": {
        "bleu_4": 0.3431, "rouge_l": 0.5204, "cider": 0.8127, "meteor": 0.3194, "spice": 0.0829,
        "bleu_1": 0.6731, "bleu_2": 0.5437, "bleu_3": 0.4316,
    },
}

REPORTED_ON = "KTVIC"  # the dataset REPORTED was scored on: shown beside a run on it alone
REPORTED_SUFFIX = " (reported)"
MISSING_RUN = "n/a"  # a metric this run could not compute (its notes say why)
MISSING_REPORTED = "—"  # a metric the paper does not give
NOT_APPLICABLE = "—"  # a models-table setting the model does not have
REPORTED_CAVEAT = (
    "The reported columns are the figures published by ViCLIPCap for the KTVIC test split, "
    "copied, not re-run. Their CNN+LSTM was really EfficientNetV2-S with a Transformer decoder, "
    "and their ViCLIPCap ran CLIP ViT-B/16 with the GPT-2 fine-tuned; they scored with raw "
    "pycocoevalcap on lowercase whitespace-split syllables (no PTB tokenizer)."
)


def display_name(model: str) -> str:
    return DISPLAY.get(model, model)


def _rank(model: str) -> tuple[int, str]:
    return (list(DISPLAY).index(model), "") if model in DISPLAY else (len(DISPLAY), model)


def display_order(models: Iterable[str]) -> list[str]:
    """`models` in display order: those in DISPLAY as listed there, then any others by name."""
    return sorted(models, key=_rank)


def _colour(model: str, models: list[str]) -> str:
    """A palette colour fixed by the model's place in DISPLAY (unnamed models take the ones after)."""
    unnamed = [m for m in models if m not in DISPLAY]
    index = list(DISPLAY).index(model) if model in DISPLAY else len(DISPLAY) + unnamed.index(model)
    return f"C{index % 10}"  # matplotlib's default cycle has 10 colours


def _title(models: list[str]) -> str:
    """`CNN+LSTM vs ViCLIPCap`, and past two models `... and 3 others`."""
    base, first, *rest = (display_name(m) for m in models)
    return f"{base} vs {first}" + (f" and {len(rest)} other{'s' if len(rest) > 1 else ''}" if rest else "")


# Which published figures each protocol's table compares with.
COMPARES_WITH = {
    "syllable": "This is ViCLIPCap's protocol.",
    "word": "Compare with figures scored on word-segmented captions: the KTVIC paper's and most Vietnamese "
            "captioning work since (their segmenter may differ: KTVIC's `segment_caption` came from RDRSegmenter).",
}


@dataclass(frozen=True)
class SharedRun:
    """What every metrics file agrees on: the dataset, the split, the image count, and each protocol's figures."""
    models: list[str]  # in display order
    dataset: str
    splits: str | None  # how the dataset's splits came about; None: not recorded (files before datasets were)
    split: str
    images: int
    protocols: dict[str, dict[str, Scores]]  # protocol name -> model -> its block (figures, protocol, notes)
    unshared: list[str]  # protocols some files hold and others do not


def _shared_run(metrics: Mapping[str, Mapping[str, Any]]) -> SharedRun:
    """The split, image count and protocols all metrics files share; refuse files that differ."""
    if BASELINE not in metrics:
        raise ViclipError(f"comparison: no metrics for the baseline, {BASELINE} "
                          f"(`viclip score --model {BASELINE}` writes them)")
    if len(metrics) < 2:
        raise ViclipError(f"comparison: no model's metrics to compare {BASELINE} with")
    models = display_order(metrics)
    files = [metrics[model] for model in models]
    # Files from before viclip read other datasets scored KTVIC and recorded no splits: those agree with any.
    for field in ("dataset", "splits", "split", "images"):
        values = {repr(f.get(field, REPORTED_ON if field == "dataset" else None)) for f in files}
        if field == "splits":
            values.discard(repr(None))
        if len(values) > 1:
            raise ViclipError(f"comparison: the metrics files disagree on {field} ({' vs '.join(sorted(values))})")
    protocols, unshared = shared_protocols({model: metrics[model] for model in models})
    if not protocols:
        raise ViclipError("comparison: the metrics files share no scoring protocol")
    splits = next((f["splits"] for f in files if f.get("splits")), None)
    return SharedRun(models, files[0].get("dataset", REPORTED_ON), splits, files[0].get("split"),
                     files[0].get("images"), dict(protocols), unshared)


def _reported_beside(run: SharedRun, reported: Mapping[str, Scores]) -> Mapping[str, Scores]:
    """The published figures, where the run scored the dataset they were scored on."""
    return reported if run.dataset == REPORTED_ON else {}


def _cell(value: float | None, missing: str, bold: bool = False) -> str:
    if value is None:
        return missing
    text = f"{value:.4f}"
    return f"**{text}**" if bold else text


def _metric_row(key: str, label: str, runs: Mapping[str, Scores], reported: Mapping[str, Scores]) -> str:
    values = [scores.get(key) for scores in runs.values()]
    # Compare what is shown: values that print the same are a tie, all bold.
    shown = [None if v is None else round(v, 4) for v in values]
    best = max((v for v in shown if v is not None), default=None)
    cells = [_cell(v, MISSING_RUN, bold=v is not None and s == best) for v, s in zip(values, shown)]
    cells += [_cell(reported[model].get(key), MISSING_REPORTED) for model in display_order(reported)]
    return f"| {label} | " + " | ".join(cells) + " |"


def _metrics_table(runs: Mapping[str, Scores], reported: Mapping[str, Scores]) -> list[str]:
    """One protocol's table: a column per run (in `runs`' order), then one per model in `reported`."""
    header = ["Metric", *map(display_name, runs),
              *(display_name(model) + REPORTED_SUFFIX for model in display_order(reported))]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(_metric_row(key, label, runs, reported) for key, label in ROWS),
    ]


def _reported_for(protocol: str, reported: Mapping[str, Scores]) -> Mapping[str, Scores]:
    return reported if protocol == "syllable" else {}


def _segmenter(described: Mapping[str, Any]) -> str:
    """`underthesea 9.5.0, function=word_tokenize, ...`: name and version, then the settings."""
    rest = ", ".join(f"{k}={v}" for k, v in described.items() if k not in ("name", "version"))
    return f"{described.get('name')} {described.get('version')}" + (f", {rest}" if rest else "")


def _protocol_section(name: str, runs: Mapping[str, Mapping[str, Any]], reported: Mapping[str, Scores]) -> list[str]:
    described = next(iter(runs.values())).get("protocol") or {}
    segmenter = described.get("segmenter")
    caveat = f" {REPORTED_CAVEAT}" if _reported_for(name, reported) else ""
    return [
        f"## {name.capitalize()} protocol",
        "",
        f"Tokenisation: {described.get('tokenisation', 'not recorded')}.",
        *([f"Segmenter: {_segmenter(segmenter)}."] if segmenter else []),
        "",
        *_metrics_table(runs, _reported_for(name, reported)),
        "",
        f"Bold: the best of this run's {len(runs)} values in each row (ties all bold). {COMPARES_WITH[name]}{caveat}",
        "",
    ]


def _config_field(config: Mapping[str, Any], key: str, model: str, within: str = "") -> Any:
    if key not in config:
        raise ViclipError(f"comparison: {model} model config.json has no {within + key!r}")
    return config[key]


def _lm(sections: Mapping[str, Any]) -> str:
    """How the LM was trained: absent for the baseline."""
    return str(sections["lm"]["train"]) if isinstance(sections.get("lm"), Mapping) else NOT_APPLICABLE


def _setup(sections: Mapping[str, Any], training: Mapping[str, Any]) -> str:
    """What else makes a variant: the model it was fine-tuned from, its retrieval's `k`."""
    start_from, retrieval = training.get("start_from"), sections.get("retrieval")
    parts = []
    if start_from is not None:
        parts.append(f"starts from {display_name(str(start_from.get('model', '?')))}")
    if retrieval is not None:
        parts.append(f"retrieval k={retrieval.get('k')}")
    return "; ".join(parts) or NOT_APPLICABLE


def _model_row(model: str, config: Mapping[str, Any], scores: Mapping[str, Any]) -> str:
    """One model's row, from its config.json (`pipeline.models.ModelSpec.to_json`)."""
    sections, training = _config_field(config, "sections", model), _config_field(config, "training", model)
    store = _config_field(_config_field(config, "fingerprints", model), "store", model, "fingerprints.")
    unfinished = scores.get("unfinished")
    cells = [
        display_name(model),
        f"{str(store.get('encoder', '?')).upper()} {store.get('model', '?')}",
        _lm(sections),
        _setup(sections, training),
        f"{_config_field(training, 'trainable_parameters', model, 'training.'):,}",
        f"{_config_field(training, 'train_seconds', model, 'training.'):.1f}",
        str(_config_field(training, "best_epoch", model, "training.")),
        str(_config_field(training, "device", model, "training.")),
        str(_config_field(training, "precision", model, "training.")),
        "not recorded" if unfinished is None else f"{unfinished} of {scores['images']}",  # recorded since lm.stop
    ]
    return "| " + " | ".join(cells) + " |"


def _models_table(models: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]],
                  run: SharedRun) -> list[str]:
    missing = [model for model in run.models if model not in models]
    if missing:
        raise ViclipError(f"comparison: no model config for {', '.join(missing)}")
    header = ["Model", "Encoder", "LM", "Setup", "Trainable parameters", "Training time (s)", "Best epoch",
              "Hardware", "Precision", "Unfinished captions"]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(_model_row(model, models[model], metrics[model]) for model in run.models),
    ]


def _note_bullets(metrics: Mapping[str, Mapping[str, Any]], run: SharedRun) -> list[str]:
    """One bullet per distinct note; a note all runs share is said once. A metric's note names its protocol."""
    labels = dict(ROWS)
    holders: dict[tuple[str, str], list[str]] = {}
    for model in run.models:
        notes = [(key, text) for key, text in (metrics[model].get("notes") or {}).items() if key not in METRICS]
        for protocol, runs in run.protocols.items():
            notes += [(f"{labels.get(key, key)} ({protocol})", text)
                      for key, text in (runs[model].get("notes") or {}).items() if key in METRICS]
        for note in notes:
            holders.setdefault(note, []).append(display_name(model))
    bullets = []
    for (key, text), names in holders.items():
        whose = "" if len(names) == len(run.models) else f" ({'; '.join(names)})"  # display names may hold commas
        bullets.append(f"- {key}{whose}: {text}")
    bullets += [f"- {name.capitalize()} protocol: not in every metrics file, so not compared" for name in run.unshared]
    return bullets


def comparison_markdown(
    metrics: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    chart: str = "comparison.png",
    reported: Mapping[str, Scores] = REPORTED,
) -> str:
    """The Markdown report: a metrics table per protocol, the models, the notes, the chart."""
    run = _shared_run(metrics)
    reported = _reported_beside(run, reported)
    title = _title(run.models)
    scorers = {str((runs[model].get("protocol") or {}).get("scorers")) for runs in run.protocols.values()
               for model in runs}
    lines = [
        f"# {title}",
        "",
        f"{run.dataset}, split `{run.split}`, {run.images:,} images"
        f"{f' (splits: {run.splits})' if run.splits else ''}; {len(run.models)} models scored under the same protocols "
        f"({', '.join(run.protocols)}).",
        "",
        *(line for name, runs in run.protocols.items() for line in _protocol_section(name, runs, reported)),
        "## Models",
        "",
        *_models_table(models, metrics, run),
        "",
        "LM: how its weights were trained (frozen, lora or full). Setup: the model a variant was fine-tuned from "
        "(its config's `start_from`) and its retrieval's `k`. Unfinished captions: test captions that reached "
        "`score.max_length` without stopping.",
        "",
        "## Notes",
        "",
        *(f"- Scorers: {s}" for s in sorted(scorers)),
        *_note_bullets(metrics, run),
        "",
        f"![{title}: this run{' and reported' if reported else ''}]({chart})",
        "",
    ]
    return "\n".join(lines)


def bar_chart(
    metrics: Mapping[str, Mapping[str, Any]], path: str | Path, reported: Mapping[str, Scores] = REPORTED
) -> None:
    """Write a PNG of the first shared protocol's table (syllables where scored): grouped bars per metric,
    this run solid, reported hatched."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    run = _shared_run(metrics)
    protocol, runs = next(iter(run.protocols.items()))
    reported = _reported_for(protocol, _reported_beside(run, reported))
    palette = display_order({*run.models, *reported})
    shown = [(key, label) for key, label in ROWS if any(scores.get(key) is not None for scores in runs.values())]
    series = [(display_name(model), runs[model], {}, _colour(model, palette)) for model in run.models]
    series += [
        (display_name(model) + REPORTED_SUFFIX, reported[model], {"alpha": 0.4, "hatch": "//"}, _colour(model, palette))
        for model in display_order(reported)
    ]
    width = 0.8 / len(series)
    # Wider with more series, so bars stay readable; the legend goes below the plot, four entries a row.
    fig, ax = plt.subplots(figsize=(max(10.0, 2 + 0.2 * len(series) * len(shown)), 4.5 + 0.3 * (len(series) // 4)),
                           layout="constrained")
    try:
        for i, (name, scores, style, colour) in enumerate(series):
            bars = [(x + (i - (len(series) - 1) / 2) * width, scores.get(key))
                    for x, (key, _) in enumerate(shown) if scores.get(key) is not None]
            if bars:
                xs, heights = zip(*bars)
                ax.bar(xs, heights, width, label=name, color=colour, edgecolor=colour, **style)
        ax.set_xticks(range(len(shown)), [label for _, label in shown])
        ax.set_ylabel("score")
        ax.set_title(f"{_title(run.models)}: {run.dataset} {run.split} split, {run.images:,} images, "
                     f"{protocol} protocol")
        fig.legend(loc="outside lower center", ncols=min(len(series), 4))
        with atomic_path(path) as partial:
            fig.savefig(partial, format="png", dpi=120)
    finally:
        plt.close(fig)
