"""dvc.yaml, written from the registry: one extract stage per feature store, a train and a score stage per
model, and the comparison. Each kind of stage is written once, here; `viclip workflow` writes the file and
`viclip workflow --check` (and tests/test_workflow.py) fails while it is not what this writes.

Why generated rather than DVC's `foreach`: models read different numbers of params sections, and DVC's
schema takes `deps` and `params` as lists of strings, never a list interpolated from a variable, so a
`foreach` could not say what each model reads.

A stage depends on the code folders it runs (tests/test_dvc_deps.py traces every stage and holds each module
it runs under one of its deps). A model's own code is its module, or its package where it has one, so no
stage of the baseline depends on ViCLIPCap's code, nor ViCLIPCap's on the baseline's.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.config import DECODING
from pipeline.core.errors import ViclipError
from pipeline.core.io import write_text
from pipeline.core.registry import MODELS, STORES
from pipeline.models import architecture

HEADER = """\
# Written by `viclip workflow` (pipeline/workflow.py) from the registry of feature stores and models
# (pipeline/core/registry.py): change it, then run that; `viclip workflow --check` fails while this file is
# not what it writes.
#   extract_<store> -> train_<model> -> score_<model> -> compare
#   an SCST model's training also starts from the model that its train.<model>.start_from names.
# Paths come from params.yaml. Deps are the code a stage runs and the artifacts it reads, params the
# sections it reads: changing one model's settings re-runs that model's branch and the comparison.
"""
COMMON = ("pipeline/cli.py", "pipeline/core")
MODEL_BASE = ("pipeline/models/__init__.py", "pipeline/models/base.py")
WIDTH = 110


def model_code(name: str) -> str:
    """The folder of the model's own package, or its module: where its architecture's code lives."""
    parts = architecture(name).build.__module__.split(".")
    return "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts) + ".py"


def _store(name: str) -> str:
    return f"${{extract.out}}/{name}"


def _model(name: str) -> str:
    return f"${{train.out}}/{name}"


def extract(store: str) -> dict:
    return {
        "cmd": f"viclip extract --store {store}",
        "deps": ["${data.root}", *COMMON, "pipeline/data", "pipeline/encoders", "stages/extract.py"],
        "params": ["data", store, "extract"],
        "outs": [_store(store)],
    }


def train(name: str) -> dict:
    model = MODELS[name]
    scst = model.objective == "scst"
    start = [_model(f"${{train.{name}.start_from}}")] if scst else []
    return {
        "cmd": f"viclip train --model {name}",
        "deps": ["${data.root}", _store(model.store), *start, *COMMON, "pipeline/data", "pipeline/encoders",
                 "pipeline/decoding", "pipeline/evaluation/text.py", "pipeline/training", *MODEL_BASE,
                 model_code(name), "stages/train.py"],
        "params": ["data", *model.reads, *(f"score.{key}" for key in DECODING if scst), "train.seed", f"train.{name}"],
        "outs": [_model(name)],
        "plots": [{f"${{train.out}}/{name}.csv": {"x": "epoch", "y": "val_cider" if scst else "val_loss",
                                                   "cache": False}}],
    }


def score(name: str) -> dict:
    return {
        "cmd": f"viclip score --model {name}",
        "deps": ["${data.root}", _store(MODELS[name].store), _model(name), *COMMON, "pipeline/data",
                 "pipeline/decoding", "pipeline/evaluation", *MODEL_BASE, model_code(name), "stages/score.py"],
        "params": ["data", "score"],
        "outs": [f"${{score.out}}/{name}.captions.json"],
        "metrics": [{f"${{score.out}}/{name}.json": {"cache": False}}],
    }


def compare() -> dict:
    return {
        "cmd": "viclip compare",
        "deps": [*(f"${{score.out}}/{name}.json" for name in MODELS), *(_model(name) for name in MODELS), *COMMON,
                 "pipeline/evaluation", "pipeline/models/__init__.py", "stages/compare.py"],
        "params": ["compare"],
        "outs": [{"${compare.out}/comparison.md": {"cache": False}}],
        "plots": [{"${compare.out}/comparison.png": {"cache": False}}],
    }


def stages() -> dict[str, dict]:
    return {
        **{f"extract_{store}": extract(store) for store in STORES},
        **{f"train_{name}": train(name) for name in MODELS},
        **{f"score_{name}": score(name) for name in MODELS},
        "compare": compare(),
    }


def _flow(value: object) -> str:
    """A YAML flow value: strings quoted where YAML would read them otherwise (a `${...}`, a colon)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return json.dumps(text) if any(c in text for c in "${}:,[] ") else text


def _field(key: str, values: list) -> list[str]:
    """`key: [a, b, ...]`, wrapped under its opening bracket at WIDTH."""
    lines, line = [], f"    {key}: ["
    indent = " " * len(line)
    for i, value in enumerate(values):
        item = _flow(value) + (", " if i < len(values) - 1 else "]")
        if len(line) + len(item.rstrip()) > WIDTH and line.strip() != f"{key}: [":
            lines.append(line.rstrip())
            line = indent
        line += item
    return [*lines, line]


def render() -> str:
    lines = [HEADER.rstrip("\n"), "stages:"]
    for name, stage in stages().items():
        lines.append(f"  {name}:")
        lines.append(f"    cmd: {stage['cmd']}")
        for key in ("deps", "params", "outs", "metrics", "plots"):
            if key in stage:
                lines += _field(key, stage[key])
    return "\n".join(lines) + "\n"


def write(path: Path, check: bool = False) -> str:
    """Write dvc.yaml at `path`; with `check`, only say whether it is current (an error if not)."""
    text = render()
    if check:
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            raise ViclipError(f"{path} is not what `viclip workflow` writes from the registry; run it")
        return f"workflow: {path} is current ({len(stages())} stages)"
    write_text(path, text)
    return f"workflow: {len(stages())} stages -> {path}"
