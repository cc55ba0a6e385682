"""`viclip demo`: the real pipeline, offline, on data and models it builds itself.

Everything goes under the work directory, a self-contained DVC project:
  data/ktvic/     synthetic KTVIC-layout images and captions
  models/clip/    a tiny open_clip ViT (architecture JSON + checkpoint)
  models/cnn/     a random torchvision ResNet-18 checkpoint (the baseline's CNN)
  models/lm/      a tiny GPT-2 and its byte-level BPE tokenizer
  params.yaml     the project's params with the tiny models and demo-sized training
  dvc.yaml        the project's own pipeline; pipeline/ and stages/ link to the code
"""

from __future__ import annotations

import collections
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from contextlib import chdir
from pathlib import Path
from typing import Any

from pipeline.core import paths, registry
from pipeline.core.config import dump_config, load_config, parse_config, yaml_parser
from pipeline.core.errors import ViclipError
from pipeline.core.io import read_json, write_json, write_text
from pipeline.data.annotations import ImageRecord
from pipeline.data.datasets import load_splits, read_source
from pipeline.demo.synthetic import caption_groups, make_dataset
from pipeline.demo.tiny import TINY_CLIP, TINY_CNN, make_tiny_clip, make_tiny_cnn, make_tiny_lm
from pipeline.evaluation.metrics import format_tables
from pipeline.evaluation.report import display_order
from pipeline.evaluation.results import score_file
from pipeline.evaluation.text import protocol_text

PROJECT = Path(__file__).resolve().parents[2]
CODE = ("pipeline", "stages")

# What the demo changes in the project's params.yaml: tiny models, demo-sized training.
# Each encoder family's tiny stand-in. The demo has one tiny CLIP, so every CLIP store (the published run's
# ViT-B/16 too) holds the same features.
TINY_ENCODERS: dict[str, dict[str, Any]] = {
    "clip": {"model": TINY_CLIP, "pretrained": f"models/clip/{TINY_CLIP}.safetensors",
             "config": f"models/clip/{TINY_CLIP}.json"},
    "cnn": {"model": TINY_CNN, "weights": f"models/cnn/{TINY_CNN}.safetensors", "image_size": 96, "grid": 3},
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "data": {"root": "data/ktvic"},
    **{name: TINY_ENCODERS[store.encoder] for name, store in registry.STORES.items()},
    "lm": {"name": "models/lm"},
    "mapper": {"prefix_length": 4, "clip_length": 4, "num_layers": 2, "num_heads": 2},
    "lstm": {"min_count": 2, "embed_dim": 64, "attention_dim": 64, "hidden_dim": 128, "dropout": 0.3},
    # The tiny LM has read nothing but captions: the default template's other words would reach it as
    # byte-level pieces it never saw. A prompt of captions alone is running text it knows.
    "retrieval": {"template": "{captions}."},
    "viclipcap_published": {"mapper": {"prefix_length": 4}},
    "train": {
        "viclipcap": {"epochs": 20, "patience": 20, "batch_size": 32, "lr": 3.0e-3, "warmup_steps": 50},
        "viclipcap_rag": {"epochs": 10, "patience": 10, "batch_size": 32, "lr": 3.0e-3, "warmup_steps": 50},
        "viclipcap_scst": {"epochs": 3, "patience": 3, "batch_size": 32, "lr": 3.0e-4, "max_length": 24},
        "viclipcap_published": {"epochs": 6, "patience": 6, "batch_size": 32, "lr": 1.0e-3, "warmup_steps": 50},
        "cnn_lstm": {"epochs": 12, "patience": 3, "batch_size": 32, "lr": 3.0e-3},
    },
    "score": {"beam_size": 3, "max_length": 24},
}


def _project_file(name: str) -> Path:
    path = PROJECT / name
    if not path.exists():
        raise ViclipError(f"{path}: not found; `viclip demo` runs from a viclip source checkout")
    return path


def demo_params(overrides: dict[str, dict[str, Any]] = OVERRIDES) -> dict[str, Any]:
    raw = yaml_parser().load(_project_file("params.yaml").read_text(encoding="utf-8"))
    return parse_config(_merge(raw, overrides), source="demo params").model_dump()


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied key by key, nested mappings merged rather than replaced."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return merged


def prepare(workdir: Path, train_images: int = 400, test_images: int = 80,
            overrides: dict[str, dict[str, Any]] = OVERRIDES) -> Path:
    """Build the demo's data, tiny models and DVC project under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = demo_params(overrides)
    root = make_dataset(workdir / params["data"]["root"], train_images, test_images)
    train = read_source(root).splits["train"]
    make_tiny_clip(workdir / "models/clip", [(r.path, c) for r in train for c in r.captions])
    make_tiny_cnn(workdir / "models/cnn")
    make_tiny_lm(caption_groups(root), workdir / params["lm"]["name"])
    write_text(workdir / "params.yaml", dump_config(params))
    return dvc_project(workdir)


def dvc_project(workdir: Path) -> Path:
    """Make `workdir`, which holds a params.yaml, a DVC project of this checkout's pipeline: its dvc.yaml, and
    links to its code."""
    for name in CODE:
        link = workdir / name
        if not link.exists():
            link.symlink_to(_project_file(name), target_is_directory=True)
    shutil.copyfile(_project_file("dvc.yaml"), workdir / "dvc.yaml")
    if not (workdir / ".dvc").is_dir():
        dvc(workdir, "init", "--no-scm", "--quiet")
    shutil.copyfile(_project_file(".dvcignore"), workdir / ".dvcignore")
    return workdir


def dvc(workdir: Path, *args: str, live: bool = False) -> str:
    """Run a DVC command in `workdir`, with this environment's `viclip` on PATH; return its output, or
    with `live` let it through as it comes (each stage's progress) and return nothing."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    sys.stdout.flush()
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env,
                            capture_output=not live, text=True)
    if result.returncode != 0:
        sys.stderr.write((result.stdout or "") + (result.stderr or ""))
        raise ViclipError(f"`dvc {' '.join(args)}` failed in {workdir} (its output is above)")
    return result.stdout or ""


def blind_captions(workdir: Path, splits: dict[str, list[ImageRecord]]) -> Path:
    """A results file giving every test image the most frequent training caption."""
    top = collections.Counter(c for r in splits["train"] for c in r.captions).most_common(1)[0][0]
    path = workdir / "blind.captions.json"
    write_json(path, [{"image_id": r.image_id, "caption": top} for r in splits["test"]])
    return path


def mean_length(captions: Iterable[str]) -> float:
    """Mean syllables per caption, as the scoring protocol counts them."""
    counts = [len(protocol_text(caption).split()) for caption in captions]
    return sum(counts) / len(counts)


def run_demo(workdir: Path) -> None:
    workdir = workdir.resolve()
    if not (workdir / "params.yaml").is_file():
        print(f"demo: building synthetic data and tiny models in {workdir}")
        prepare(workdir)
    print("demo: dvc repro (extract -> train -> score, for the baseline, ViCLIPCap and its variants; then compare)")
    dvc(workdir, "repro", live=True)
    config = load_config(workdir / "params.yaml")
    with chdir(workdir):
        splits = load_splits(config.data)
        # Columns in the report's order: the baseline first.
        models = display_order(paths.scored_models(config))
        scores = {m: read_json(paths.metrics_path(config, m)) for m in models}
        scores["blind"] = score_file(config, blind_captions(workdir, splits).name)
        lengths = {m: mean_length(c["caption"] for c in read_json(paths.captions_path(config, m))) for m in models}
        lengths["references"] = mean_length(c for r in splits["test"] for c in r.captions)
    first = scores[registry.DEFAULT_MODEL]
    print(f"\nKTVIC-layout synthetic test split, {first['images']} images")
    print(format_tables(scores))
    print("blind = the most frequent training caption for every image")
    print(f"captions that never stopped (of {first['images']}): "
          + ", ".join(f"{m} {scores[m]['unfinished']}" for m in models))
    print("mean caption length (syllables): " + ", ".join(f"{k} {v:.1f}" for k, v in lengths.items()))
    report = (workdir / paths.report_path(config)).read_text(encoding="utf-8")
    print("\nablation: what each model trains and what it cost (from the comparison report)")
    print(report[report.index("## Models") :].split("\n## ")[0].removeprefix("## Models").strip())
    print(f"\ncomparison table and chart: {workdir / paths.report_path(config)}, {workdir / paths.chart_path(config)}")
    print(f"serve every model (API and page at http://127.0.0.1:8000/): {serve_command(workdir)}")


def serve_command(workdir: Path) -> str:
    """The command that serves the demo's models: from its folder, since its params' paths are relative to it."""
    viclip = Path(sys.executable).parent / "viclip"  # this environment's, as `dvc` above puts it on PATH
    return f"cd {shlex.quote(str(workdir))} && {shlex.quote(str(viclip)) if viclip.is_file() else 'viclip'} serve --model all"
