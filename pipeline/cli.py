"""The `viclip` command. Each command declares its options and hands off to a plain function.

Domain errors (ViclipError) become one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.core import distributed, paths
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ViclipError
from pipeline.core.registry import DEFAULT_MODEL, DEFAULT_STORE, MODELS, STORES
from pipeline.data.datasets import SPLITS
from pipeline.evaluation.protocols import SETTINGS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Vietnamese image captioning: frozen CLIP + trained mapping network + frozen GPT-2.",
)

Params = Annotated[Path, typer.Option("--params", help="The params file to read.")]
ModelName = Annotated[str, typer.Option("--model", help=f"Which model: {', '.join(MODELS)}.")]
ModelDir = Annotated[Optional[Path], typer.Option(help="Read the model from this directory instead (default: from params).")]


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        typer.echo(f"error: {option} must be one of {', '.join(choices)}, not {value!r}", err=True)
        raise typer.Exit(2)


@contextmanager
def _clear_errors() -> Iterator[None]:
    where = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
    try:
        yield
    except ViclipError as error:
        typer.echo(f"error: {where}{error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing half-written was kept", err=True)
        raise typer.Exit(130) from None


def _run(params: Path, stage: Callable[[Config], str]) -> None:
    """Run a stage, on every rank where torchrun started several; the main rank prints its summary."""
    with _clear_errors(), distributed.session():
        summary = stage(load_config(params))
        if distributed.is_main():
            typer.echo(summary)


@app.command()
def extract(
    store: Annotated[str, typer.Option(help="Which feature store: " + "; ".join(
        f"{s} ({', '.join(m for m in MODELS if MODELS[m].store == s)})" for s in STORES) + ".")] = DEFAULT_STORE,
    split: Annotated[Optional[str], typer.Option(help=f"Only this split ({', '.join(SPLITS)}).")] = None,
    skip_bad_images: Annotated[bool, typer.Option(
        "--skip-bad-images", help="Skip unreadable images (recorded in the store) instead of stopping.")] = False,
    params: Params = Path("params.yaml"),
) -> None:
    """Stage 1: run a store's frozen image encoder once over every image; write the HDF5 feature store."""
    from stages import extract as stage

    _choice("--store", store, tuple(STORES))
    if split is not None:
        _choice("--split", split, SPLITS)
    _run(params, lambda config: stage.run(config, (split,) if split else SPLITS, skip_bad_images, store))


@app.command()
def train(model: ModelName = DEFAULT_MODEL, params: Params = Path("params.yaml")) -> None:
    """Stage 2: train a model on the stored image features, its encoder (and LM) frozen."""
    from stages import train as stage

    _choice("--model", model, tuple(MODELS))
    _run(params, lambda config: stage.run(config, model))


@app.command()
def score(
    captions: Annotated[Optional[Path], typer.Option(
        help="Score this COCO results file (JSON list of {image_id, caption}) instead of decoding.")] = None,
    model: Annotated[Optional[str], typer.Option(
        help=f"Which model to decode with: {', '.join(MODELS)} (default: {DEFAULT_MODEL}).")] = None,
    model_dir: ModelDir = None,
    protocol: Annotated[Optional[str], typer.Option(
        help=f"With --captions: {' | '.join(SETTINGS)} (default: score.protocol in params).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="With --captions: also write the metrics JSON here.")] = None,
    params: Params = Path("params.yaml"),
) -> None:
    """Stage 3: decode the test split with a trained model and score it (or score --captions FILE)."""
    from pipeline.core.io import write_json
    from pipeline.evaluation.metrics import METRICS, blocks, format_tables
    from pipeline.evaluation.results import score_file
    from stages import score as stage

    if captions is not None and (model is not None or model_dir is not None):
        typer.echo("error: --model and --model-dir choose what to decode; --captions scores the file's captions",
                   err=True)
        raise typer.Exit(2)
    model = model or DEFAULT_MODEL
    _choice("--model", model, tuple(MODELS))
    if protocol is not None:
        _choice("--protocol", protocol, SETTINGS)
        if captions is None:
            typer.echo("error: --protocol goes with --captions; decoding scores under score.protocol in params",
                       err=True)
            raise typer.Exit(2)
    with _clear_errors(), distributed.session():
        config = load_config(params)
        if captions is None:
            metrics, summary = stage.run(config, model, model_dir)
            if not distributed.is_main():  # the main rank scored the gathered captions
                return
        elif not distributed.is_main():  # nothing to divide: one rank scores the file
            return
        else:
            metrics = score_file(config, captions, protocol)
            summary = f"score: {metrics['images']} test images from {captions}"
            if metrics["dropped"]:
                summary += f", {metrics['dropped']} captions dropped (images skipped at extraction)"
            if out is not None:
                write_json(out, metrics)
                summary += f" -> {out}"
        typer.echo(format_tables({metrics["model"]: metrics}))
        for key, note in metrics["notes"].items():  # about the run: top level, whichever protocols were scored
            if key not in METRICS:
                typer.echo(f"{key}: {note}")
        for name, block in blocks(metrics).items():
            for key, note in block.get("notes", {}).items():
                if key in METRICS:
                    typer.echo(f"{key} ({name}): n/a, {note}")
        typer.echo(summary)


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files to caption.")],
    model: ModelName = DEFAULT_MODEL,
    model_dir: ModelDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {image, caption}.")] = False,
    params: Params = Path("params.yaml"),
) -> None:
    """Caption new image files with a trained model, many at once; one line per image."""
    from pipeline.decoding.inference import caption_files

    _choice("--model", model, tuple(MODELS))
    with _clear_errors():
        config = load_config(params)
        results = caption_files(config, images, model_dir or paths.model_dir(config, model))
    if as_json:
        typer.echo(json.dumps([{"image": str(p), "caption": c} for p, c in results], ensure_ascii=False, indent=1))
    else:
        for path, text in results:
            typer.echo(f"{path}\t{text}")


@app.command()
def compare(params: Params = Path("params.yaml")) -> None:
    """Stage 4: the scored models side by side: comparison.md (the published table layout) and a bar chart."""
    from stages import compare as stage

    _run(params, stage.run)


@app.command()
def workflow(
    check: Annotated[bool, typer.Option(help="Only check that dvc.yaml is what it would write.")] = False,
    path: Annotated[Path, typer.Option(help="The DVC pipeline file.")] = Path("dvc.yaml"),
) -> None:
    """Write dvc.yaml from the registry of feature stores and models (after adding one)."""
    from pipeline import workflow as dvc_file

    with _clear_errors():
        typer.echo(dvc_file.write(path, check))


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Which model, or all: every trained one, side by side.")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="The address to listen on (only this machine by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8000,
    params: Params = Path("params.yaml"),
) -> None:
    """Serve trained models: an HTTP API (POST /v1/captions, GET /v1/models) and a page at /."""
    from pipeline.serve import serve as run_service

    _choice("--model", model, (*MODELS, "all"))
    with _clear_errors():
        config = load_config(params)
        trained = [m for m in MODELS if paths.model_dir(config, m).is_dir()]
        if model == "all" and not trained:
            raise ViclipError(f"no trained model under {config.train.out}; run `viclip train` first")
        run_service(config, trained if model == "all" else [model], host, port)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo builds its data, models and DVC project.")] = Path("demo-run"),
) -> None:
    """The whole pipeline offline: synthetic KTVIC-layout data, tiny local models, `dvc repro`, the comparison."""
    from pipeline.demo import run_demo

    with _clear_errors():
        run_demo(workdir)


def main() -> None:
    argv = sys.argv[1:]
    try:
        nproc = distributed.wants_launch(argv)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    if nproc:
        sys.exit(distributed.launch(nproc, argv))
    app(prog_name="viclip")


if __name__ == "__main__":
    sys.exit(main())
