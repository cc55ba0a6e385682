"""`viclip serve`: a project's trained models behind an HTTP API and a page, loaded once.

  app      the FastAPI app: endpoints, limits, the checks every upload goes through
  batcher  micro-batching: concurrent requests share one model call, one call at a time per device
  static/  the page (HTML, script, style; no asset from elsewhere, so it works offline)

FastAPI fits a JSON API with multipart uploads and a static page, and its test client exercises the app
in-process; uvicorn is the ASGI server it is usually run on.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Config
from pipeline.core.devices import best_device
from pipeline.core.errors import ViclipError
from pipeline.core.io import read_json
from pipeline.data.datasets import load_splits
from pipeline.decoding.inference import LoadedModel
from pipeline.serve.app import Limits, Served, create_app

__all__ = ["Limits", "Served", "create_app", "load_served", "serve"]

SAMPLES = 4  # test images the page offers to try


def load_served(config: Config, names: list[str]) -> Served:
    """Load models `names` of the project `config` describes (paths relative to the working directory, which is
    the project folder the service's answers name paths relative to)."""
    device = best_device()
    # Resolved now: what the service reads later must not depend on its working directory then.
    models = {name: LoadedModel.load(paths.model_dir(config, name).resolve(), device) for name in names}
    metrics = {}
    for name in names:
        path = paths.metrics_path(config, name)
        metrics[name] = read_json(path) if path.is_file() else None
    return Served(models, config.score, metrics, paths.report_path(config).resolve(),
                  paths.chart_path(config).resolve(), _samples(config), root=Path.cwd().resolve())


def _samples(config: Config):
    """The first few test-split images, where the data is at hand: images the models were made for."""
    try:
        test = load_splits(config.data)["test"]
        return tuple(record.path.resolve() for record in test[:SAMPLES] if record.path.is_file())
    except ViclipError:
        return ()


def serve(config: Config, names: list[str], host: str, port: int, limits: Limits = Limits()) -> None:
    """Load the models, then answer requests until interrupted."""
    import uvicorn

    app = create_app(load_served(config, names), limits)
    print(f"viclip serve: {', '.join(names)} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
