"""The caption service's HTTP API and page (FastAPI), over models loaded once.

  GET  /                  the page (static/index.html, with its script and style; nothing from elsewhere)
  POST /v1/captions       multipart field `images` (one or more files); optional fields `model`
                          (repeated; default every model served), `beam_size`, `max_length`
  GET  /v1/models         what is loaded, and each run's test metrics
  GET  /v1/report         the run's comparison table (markdown), if `viclip compare` wrote one; its image line
                          links the chart's endpoint
  GET  /v1/report/chart   its chart (PNG)
  GET  /v1/samples        names of a few test images to try; GET /v1/samples/{n} sends one
  GET  /healthz           200 while the service is up

Every error is JSON, {"error": "..."}, with a 4xx status for anything a client sent: an upload is read
from memory (the service never opens a path a client names), checked for its size in bytes, then in
pixels before its pixels are decoded, then decoded. The body as a whole is limited too, since neither
the framework nor the server limits it.

No answer names a place on the server's disk: a path goes out relative to the project folder where it lies
in it (as params.yaml names it), relative to the installed packages' folder where it lies there (the SPICE
jars' folder in a metrics note: `pycocoevalcap/spice/lib`), and as `…/` and its name elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sysconfig
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.core.config import ScoreConfig
from pipeline.decoding.inference import LoadedModel
from pipeline.encoders.images import BadImage, ImageTooLarge, open_rgb
from pipeline.evaluation.report import display_name
from pipeline.serve.batcher import JobCaptions, MicroBatcher, QueueFull

STATIC = Path(__file__).parent / "static"
FIELDS = ("images", "model", "beam_size", "max_length")
log = logging.getLogger("viclip.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how requests are batched."""

    max_images: int = 16  # files in one request
    max_image_bytes: int = 8 * 2**20  # one file
    max_body_bytes: int = 32 * 2**20  # the whole request: many images share it
    max_pixels: int = Image.MAX_IMAGE_PIXELS  # Pillow's own limit, enforced before decoding
    max_beam_size: int = 10
    max_length: int = 100  # caption tokens; the LM's context may cap it lower
    batch_window_s: float = 0.005  # how long a job waits for others to share its model call
    max_batch: int = 32  # images in one model call
    max_queue: int = 256  # images waiting for the model; past that, 503 at once


@dataclass
class Served:
    """What a service serves: the loaded models, their decoding defaults, and the run's report."""

    models: dict[str, LoadedModel]
    defaults: ScoreConfig  # the params' score section: beam size, max length, length penalty
    metrics: dict[str, dict[str, Any] | None]  # each model's test metrics JSON, where `viclip score` wrote one
    report: Path | None = None  # comparison.md
    chart: Path | None = None  # comparison.png
    samples: tuple[Path, ...] = ()  # test images the page offers to try
    root: Path | None = None  # the project folder: paths a client sees are relative to it


# A path in free text (a metrics note, the report): a slash that starts a word (not one inside a URL, a
# relative path, "1/2" or a path already shown as `…/name`), up to a space, a quote, a bracket or punctuation
# that ends a clause.
ABSOLUTE = re.compile(r"(?<![\w.~:/\\…-])/(?=[\w.@+~-])[^\s'\"`()\[\]<>{},;:|*]+")
# The report's image line: `![alt](target)`, alone on its line.
IMAGE_LINE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
PACKAGES = tuple(dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")))


def public_path(path: str | Path, root: Path | None) -> str:
    """A server path as a client may see it: relative to the project folder `root` or to the installed packages'
    folder where it lies in one, else `…/` and its name; a relative path (as params.yaml names it) as it is."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    bases = [base for folder in ((root,) if root else ()) + PACKAGES for base in dict.fromkeys((folder, folder.resolve()))]
    for candidate in dict.fromkeys((path, path.resolve())):
        for base in bases:
            if candidate.is_relative_to(base):
                return candidate.relative_to(base).as_posix()
    return f"…/{path.name}"


def public_text(text: str, root: Path | None) -> str:
    """`text` with every absolute path in it made a `public_path` (a full stop after one stays a full stop)."""
    def shown(match: re.Match) -> str:
        path = match.group(0).rstrip(".")
        return public_path(path, root) + match.group(0)[len(path):]

    return ABSOLUTE.sub(shown, text)


def public(value: Any, root: Path | None) -> Any:
    """JSON `value` (a metrics file, say) with `public_text` applied to every string in it."""
    if isinstance(value, dict):
        return {public(key, root): public(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [public(item, root) for item in value]
    return public_text(value, root) if isinstance(value, str) else value


def report_markdown(served: Served, chart_url: str | None) -> str | None:
    """The comparison report as a client gets it: its image line links `chart_url` (where it shows the chart the
    service serves; any other image line is left out, as is the chart's where there is none), no server path."""
    if not (served.report and served.report.is_file()):
        return None
    lines = []
    for line in served.report.read_text(encoding="utf-8").splitlines(keepends=True):
        image = IMAGE_LINE.fullmatch(line.strip())
        if image is None:
            lines.append(public_text(line, served.root))
        elif chart_url and served.chart and (served.report.parent / image[2]).resolve() == served.chart.resolve():
            lines.append(f"![{image[1]}]({chart_url})\n")
    return "".join(lines)


class ClientError(Exception):
    """A request the service will not serve; `status` is 4xx (503: the queue is full)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes, by its Content-Length or, when that is absent
    or lies, as it arrives, before the framework spools it to memory or disk."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            message = "bad Content-Length" if not declared.isdigit() else self._too_large()
            return await _error(413 if declared.isdigit() else 400, message)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ClientError(413, self._too_large())
            return message

        return await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"request body over {self.limit} bytes"


def _integer(form, name: str, default: int, high: int) -> int:
    raw = form.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if value is None:
        raise ClientError(400, f"{name} must be an integer, not {str(raw)[:40]!r}")
    if not 1 <= value <= high:
        raise ClientError(400, f"{name} must be between 1 and {high}, not {value}")
    return value


def describe(loaded: LoadedModel, metrics: dict[str, Any] | None, root: Path | None = None) -> dict[str, Any]:
    """What GET /v1/models says of one model: enough to know what answers, and how well it scored. Its paths
    (its directory, an LM or weights named by path, a metrics note) go out as `public_path`s of project `root`."""
    spec = loaded.spec
    lm = spec.sections.get("lm")
    return public({
        "model": loaded.name,
        "display": display_name(loaded.name),
        "directory": public_path(loaded.model_dir, root),
        "store": spec.store,
        "encoder": {"name": spec.store_attrs.get("encoder"), "model": spec.store_attrs.get("model"),
                    "weights": spec.store_attrs.get("weights") or spec.store_attrs.get("pretrained")},
        "lm": None if lm is None else {"name": lm.name, "stop": lm.stop, "train": lm.train},
        "precision": {"training": spec.training.get("precision"), "decoding": "fp32"},
        "trainable_parameters": spec.training.get("trainable_parameters"),
        "trained_on": spec.training.get("dataset"),  # None: trained before viclip read datasets other than KTVIC
        "device": str(loaded.device),
        "test_metrics": metrics,
    }, root)


def create_app(served: Served, limits: Limits = Limits()) -> FastAPI:
    """The service over `served`; its batching worker starts now and stops with the app."""
    # One worker per device: one model call at a time on each.
    devices = {loaded.device for loaded in served.models.values()}
    batchers = {
        device: MicroBatcher({n: m for n, m in served.models.items() if m.device == device},
                             limits.batch_window_s, limits.max_batch, limits.max_queue)
        for device in devices
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for batcher in batchers.values():
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="viclip", summary="Vietnamese image captions", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages would load assets from a CDN
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.batchers = batchers

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, error: ClientError) -> JSONResponse:
        return _error(error.status, str(error), **({"Retry-After": "1"} if error.status == 503 else {}))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error ({type(error).__name__})")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/healthz")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(served.models)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "models": [describe(loaded, served.metrics.get(name), served.root) for name, loaded in served.models.items()],
            "defaults": {"beam_size": served.defaults.beam_size, "max_length": served.defaults.max_length},
            "limits": asdict(limits),
        }

    @app.get("/v1/report")
    async def report() -> dict[str, Any]:
        chart_url = "/v1/report/chart" if served.chart and served.chart.is_file() else None
        return {"markdown": report_markdown(served, chart_url), "chart": chart_url}

    @app.get("/v1/report/chart")
    async def chart() -> FileResponse:
        if not (served.chart and served.chart.is_file()):
            raise ClientError(404, "no comparison chart: run `viclip compare`")
        return FileResponse(served.chart, media_type="image/png")

    @app.get("/v1/samples")
    async def samples() -> dict[str, Any]:
        return {"samples": [{"name": path.name, "url": f"/v1/samples/{n}"} for n, path in enumerate(served.samples)]}

    @app.get("/v1/samples/{index}")
    async def sample(index: int) -> FileResponse:
        # An index into the service's own list: a client never names a path.
        if not 0 <= index < len(served.samples):
            raise ClientError(404, f"no sample {index}; there are {len(served.samples)}")
        return FileResponse(served.samples[index])

    @app.post("/v1/captions")
    async def captions(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise ClientError(415, f"send multipart/form-data with the images in field 'images', not {kind or 'no content type'!r}")
        form = await request.form(max_files=limits.max_images, max_fields=len(FIELDS) + 4)
        try:
            return await _caption(form, started)
        finally:
            await form.close()

    async def _caption(form, started: float) -> dict[str, Any]:
        unknown = sorted({key for key in form.keys() if key not in FIELDS})
        if unknown:
            raise ClientError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(FIELDS)}")
        uploads = form.getlist("images")
        if not uploads:
            raise ClientError(400, "no images: send one or more files in the multipart field 'images'")
        if not all(isinstance(upload, UploadFile) for upload in uploads):
            raise ClientError(400, "field 'images' must hold files, not text")
        names = form.getlist("model") or list(served.models)
        for name in names:
            if name not in served.models:
                raise ClientError(400, f"unknown model {name!r}; this service has {', '.join(served.models)}")
        settings = served.defaults.model_copy(update={
            "beam_size": _integer(form, "beam_size", served.defaults.beam_size, limits.max_beam_size),
            "max_length": _integer(form, "max_length", min(served.defaults.max_length, limits.max_length),
                                   limits.max_length),
        })

        images = [await _read(upload, n) for n, upload in enumerate(uploads)]
        read_s = time.perf_counter() - started
        jobs = {}
        for name in dict.fromkeys(names):
            loaded = served.models[name]
            pixels = await run_in_threadpool(lambda: torch.stack([loaded.preprocess(image) for _, image in images]))
            try:
                jobs[name] = batchers[loaded.device].submit(name, pixels, settings)
            except QueueFull as full:
                raise ClientError(503, f"busy: {full}; try again shortly") from None
        decoded: dict[str, JobCaptions] = {name: await asyncio.wrap_future(job) for name, job in jobs.items()}
        return {
            "images": [
                {"name": name, "width": image.width, "height": image.height,
                 "captions": {model: result.texts[n] for model, result in decoded.items()}}
                for n, (name, image) in enumerate(images)
            ],
            "settings": {"beam_size": settings.beam_size, "max_length": settings.max_length},
            "timings": {
                "read_s": read_s,
                "models": {model: {"queued_s": r.queued_s, "model_s": r.model_s, "batch_images": r.batch_images}
                           for model, r in decoded.items()},
                "total_s": time.perf_counter() - started,
            },
        }

    async def _read(upload: UploadFile, index: int) -> tuple[str, Image.Image]:
        name = upload.filename or f"image {index + 1}"
        data = await upload.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            raise ClientError(413, f"{name!r}: over {limits.max_image_bytes} bytes")
        if not data:
            raise ClientError(400, f"{name!r}: empty file")
        try:
            return name, await run_in_threadpool(open_rgb, io.BytesIO(data), limits.max_pixels)
        except BadImage as bad:
            raise ClientError(413 if isinstance(bad, ImageTooLarge) else 400, f"{name!r}: {bad}") from None

    return app
