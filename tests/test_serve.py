"""`viclip serve`, in-process through the framework's client: every endpoint, every bad input a client can
send (a 4xx JSON error naming it, and the service still answers), concurrent requests batched and
captioned as `viclip caption` captions them, and a full queue answered at once."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
import sys
import sysconfig
import threading
from contextlib import chdir
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as photos

from pipeline.core.config import load_config
from pipeline.core.registry import MODELS, STORES
from pipeline.decoding.inference import LoadedModel
from pipeline.encoders.images import BadImage, ImageTooLarge, open_rgb
from pipeline.evaluation.report import display_name
from pipeline.serve import Limits, Served, create_app, load_served
from tests.conftest import invoke


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A PNG of a few kilobytes that decodes to width x height pixels."""
    return encoded(Image.new("1", (width, height)), "PNG")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> dict[str, bytes]:
    """Real photographs, in the colour modes and formats users send."""
    chelsea = Image.fromarray(photos.chelsea())
    return {
        "astronaut.jpg": encoded(Image.fromarray(photos.astronaut()), "JPEG"),
        "camera.png": encoded(Image.fromarray(photos.camera()), "PNG"),  # greyscale
        "chelsea_cmyk.jpg": encoded(chelsea.convert("CMYK"), "JPEG"),
        "chelsea_rgba.png": encoded(chelsea.convert("RGBA"), "PNG"),
    }


@pytest.fixture(scope="module")
def reference(demo, photo_files, tmp_path_factory) -> dict[str, dict[str, str]]:
    """model -> photo name -> the caption `viclip caption` prints for it."""
    folder = tmp_path_factory.mktemp("photos")
    for name, data in photo_files.items():
        (folder / name).write_bytes(data)
    captions = {}
    with chdir(demo):
        for model in MODELS:
            result = invoke("caption", "--model", model, "--json", *map(str, sorted(folder.iterdir())))
            assert result.exit_code == 0, result.output
            captions[model] = {Path(r["image"]).name: r["caption"] for r in json.loads(result.stdout)}
    return captions


@pytest.fixture(scope="module")
def served(demo) -> Served:
    with chdir(demo):
        return load_served(load_config("params.yaml"), list(MODELS))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as client:
        yield client


def post(client, files: list[tuple[str, bytes]], **fields):
    return client.post("/v1/captions", files=[("images", (name, data)) for name, data in files], data=fields)


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


def test_health_and_what_is_loaded(client, demo):
    assert client.get("/healthz").json() == {"status": "ok", "models": list(MODELS)}
    info = client.get("/v1/models").json()
    assert [m["model"] for m in info["models"]] == list(MODELS)
    for described in info["models"]:
        model = described["model"]
        config = json.loads((demo / f"artifacts/models/{model}/config.json").read_text())
        metrics = json.loads((demo / f"artifacts/metrics/{model}.json").read_text())
        assert described["trainable_parameters"] == config["training"]["trainable_parameters"] > 0
        assert described["precision"]["training"] == config["training"]["precision"]
        assert described["test_metrics"]["cider"] == metrics["cider"]
        assert described["trained_on"] == described["test_metrics"]["dataset"] == "KTVIC"  # the demo's layout
        assert described["store"] == MODELS[model].store
        assert described["encoder"]["name"] == STORES[described["store"]].encoder
        assert described["display"] == display_name(model)
    by_name = {m["model"]: m for m in info["models"]}
    assert by_name["viclipcap"]["lm"]["name"] == "models/lm" and by_name["cnn_lstm"]["lm"] is None
    assert by_name["viclipcap"]["lm"]["train"] == "frozen"
    assert info["defaults"] == {"beam_size": 3, "max_length": 24}


def test_captions_are_those_of_viclip_caption(client, photo_files, reference):
    response = post(client, list(photo_files.items()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["name"] for image in body["images"]] == list(photo_files)
    for image in body["images"]:
        assert image["captions"] == {model: reference[model][image["name"]] for model in MODELS}
    assert body["images"][0]["width"] == 512 and body["settings"] == {"beam_size": 3, "max_length": 24}
    for timing in body["timings"]["models"].values():
        assert timing["model_s"] > 0 and timing["queued_s"] >= 0 and timing["batch_images"] == len(photo_files)


def test_one_model_and_its_own_settings(client, photo_files):
    name, data = next(iter(photo_files.items()))
    response = post(client, [(name, data)], model="cnn_lstm", beam_size="1", max_length="2")
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body["images"][0]["captions"]) == ["cnn_lstm"] and body["settings"] == {"beam_size": 1, "max_length": 2}
    assert len(body["images"][0]["captions"]["cnn_lstm"].split()) <= 2


@pytest.mark.parametrize("limits, batched", [(Limits(batch_window_s=0.2), True),
                                            (Limits(max_batch=1, batch_window_s=0), False)])
def test_concurrent_requests_are_decoded_together_with_the_same_captions(served, photo_files, reference, limits, batched):
    """Twelve clients at once, one photo each: every one answered with `viclip caption`'s caption, and the
    requests shared model calls; with batches of one image (the load benchmark's baseline), none did."""
    names = [list(photo_files)[n % len(photo_files)] for n in range(12)]

    async def everyone():
        app = create_app(served, limits)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://viclip") as client:
            return await asyncio.gather(*(
                client.post("/v1/captions", files=[("images", (name, photo_files[name]))]) for name in names))

    responses = asyncio.run(everyone())
    assert [r.status_code for r in responses] == [200] * len(names)
    for name, response in zip(names, responses):
        assert response.json()["images"][0]["captions"] == {m: reference[m][name] for m in MODELS}
    batches = [r.json()["timings"]["models"][m]["batch_images"] for r in responses for m in MODELS]
    assert (max(batches) > 1) == batched, batches


class Held(LoadedModel):
    """The real model, held at the start of each call until the test lets it go."""

    started: threading.Event
    release: threading.Event

    def caption_pixels(self, pixels, settings):
        self.started.set()
        assert self.release.wait(30)
        return super().caption_pixels(pixels, settings)


def test_a_full_queue_is_answered_503_at_once_and_the_rest_are_served(served, photo_files):
    loaded = served.models["viclipcap"]
    held = Held(*(getattr(loaded, f.name) for f in dataclasses.fields(LoadedModel)))
    held.started, held.release = threading.Event(), threading.Event()
    app = create_app(dataclasses.replace(served, models={"viclipcap": held}), Limits(max_queue=1, batch_window_s=0))
    photo = [("images", next(iter(photo_files.items())))]

    async def flood():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://viclip") as client:
            running = asyncio.create_task(client.post("/v1/captions", files=photo))
            await asyncio.to_thread(held.started.wait, 30)  # the worker holds the first request
            waiting = asyncio.create_task(client.post("/v1/captions", files=photo))  # fills the queue
            while app.state.batchers[loaded.device]._queued < 1:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/captions", files=photo)
            held.release.set()
            return refused, await running, await waiting

    refused, *served_ = asyncio.run(flood())
    assert_error(refused, 503, "busy", "the queue holds 1")
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in served_] == [200, 200]


@pytest.mark.parametrize("files, fields, status, fragments", [
    ([("notes.txt", b"not a picture")], {}, 400, ["'notes.txt'", "not an image"]),
    ([("empty.jpg", b"")], {}, 400, ["'empty.jpg'", "empty file"]),
    ([("cut.jpg", "truncated")], {}, 400, ["'cut.jpg'", "unreadable"]),
    # Pillow only warns between its limit (89.5M pixels) and twice it, and raises above: both are refused.
    ([("warns.png", bomb(10_000, 10_000))], {}, 413, ["'warns.png'", "too large", "100000000 pixels"]),
    ([("raises.png", bomb(20_000, 10_000))], {}, 413, ["'raises.png'", "too large", "200000000 pixels"]),
    ([("a.jpg", "photo")], {"model": "resnet"}, 400, ["unknown model 'resnet'", ", ".join(MODELS)]),
    ([("a.jpg", "photo")], {"beam_size": "0"}, 400, ["beam_size must be between 1 and 10, not 0"]),
    ([("a.jpg", "photo")], {"beam_size": "11"}, 400, ["beam_size must be between 1 and 10, not 11"]),
    ([("a.jpg", "photo")], {"beam_size": "five"}, 400, ["beam_size must be an integer, not 'five'"]),
    ([("a.jpg", "photo")], {"max_length": "²"}, 400, ["max_length must be an integer"]),
    ([("a.jpg", "photo")], {"max_length": "1000"}, 400, ["max_length must be between 1 and 100"]),
    ([("a.jpg", "photo")], {"temperature": "2"}, 400, ["unknown field(s) 'temperature'"]),
    ([("a.jpg", "photo")] * 17, {}, 400, ["Too many files", "16"]),
])
def test_bad_requests_get_a_clear_4xx_and_the_service_lives_on(client, photo_files, files, fields, status, fragments):
    photo = photo_files["astronaut.jpg"]
    contents = {"photo": photo, "truncated": photo[: len(photo) // 3]}
    files = [(name, contents.get(data, data)) for name, data in files]
    assert_error(post(client, files, **fields), status, *fragments)
    assert post(client, [("astronaut.jpg", photo)]).status_code == 200


def test_images_as_text_or_not_multipart_are_refused(client, photo_files):
    # (None, text) makes a multipart field that is not a file.
    assert_error(client.post("/v1/captions", files={"model": (None, "viclipcap")}), 400, "no images", "'images'")
    assert_error(client.post("/v1/captions", files={"images": (None, "/etc/passwd")}), 400, "'images' must hold files")
    assert_error(client.post("/v1/captions", json={"images": ["astronaut.jpg"]}), 415, "multipart/form-data", "application/json")
    assert_error(client.post("/v1/captions", content=b"x", headers={"content-type": "image/png"}), 415, "image/png")
    assert_error(client.get("/v1/captions"), 405, "Method Not Allowed")
    assert_error(client.get("/v2/nothing"), 404, "Not Found")


def test_a_file_name_is_only_a_name(client, demo, photo_files):
    """The service reads the upload, never the path a client names."""
    real = str(next((demo / "data/ktvic/public-test-images").iterdir()))
    assert_error(post(client, [(real, b"garbage")]), 400, "not an image")
    response = post(client, [("../../etc/passwd", photo_files["camera.png"])])
    assert response.status_code == 200 and response.json()["images"][0]["name"] == "../../etc/passwd"


def test_byte_limits_on_an_image_and_on_the_body(served, photo_files):
    photo = photo_files["astronaut.jpg"]
    with TestClient(create_app(served, Limits(max_image_bytes=len(photo) - 1))) as client:
        assert_error(post(client, [("astronaut.jpg", photo)]), 413, "'astronaut.jpg'", f"over {len(photo) - 1} bytes")
        small = encoded(Image.open(io.BytesIO(photo)).resize((64, 64)), "JPEG")
        assert post(client, [("small.jpg", small)]).status_code == 200
    with TestClient(create_app(served, Limits(max_body_bytes=len(photo) // 2))) as client:
        assert_error(post(client, [("astronaut.jpg", photo)]), 413, f"request body over {len(photo) // 2} bytes")

        # A body with no Content-Length (chunked) is counted as it arrives.
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n"
            yield from (photo[i:i + 4096] for i in range(0, len(photo), 4096))
            yield b"\r\n--b--\r\n"

        response = client.post("/v1/captions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(response, 413, "request body over")
        assert client.get("/healthz").status_code == 200


def test_the_page_and_what_it_shows(client, demo):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta charset="utf-8">' in page.text and 'lang="vi"' in page.text and "chú thích ảnh" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    # Nothing is fetched from elsewhere: the page must work offline.
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    report = client.get("/v1/report").json()
    assert "| Metric | CNN+LSTM | ViCLIPCap |" in report["markdown"]
    chart = client.get(report["chart"])
    assert chart.status_code == 200 and chart.content.startswith(b"\x89PNG")
    samples = client.get("/v1/samples").json()["samples"]
    assert len(samples) == 4
    assert Image.open(io.BytesIO(client.get(samples[0]["url"]).content)).size[0] > 0
    assert_error(client.get("/v1/samples/4"), 404, "no sample 4")


# An absolute path in free text: a slash that starts a word (not one inside a URL, a relative path or "1/2").
ABSOLUTE = re.compile(r"(?<![\w.~:/-])/([\w.@+-]+)")


def server_paths(value, roots: list[Path]) -> list[str]:
    """The strings of a JSON answer (keys too) that name a place on this machine: one of `roots`, or an absolute
    path whose first folder exists here (/tmp, /work, /usr...; the service's own URLs, /v1/..., do not)."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in server_paths(key, roots) + server_paths(item, roots)]
    if isinstance(value, list):
        return [found for item in value for found in server_paths(item, roots)]
    if isinstance(value, str) and (any(str(root) in value for root in roots)
                                   or any(Path("/", m.group(1)).exists() for m in ABSOLUTE.finditer(value))):
        return [value]
    return []


def every_answer(client, photo: bytes) -> dict[str, object]:
    """What each endpoint sends, successes and errors alike."""
    answers = {url: client.get(url) for url in ("/healthz", "/v1/models", "/v1/report", "/v1/samples", "/v1/samples/99")}
    answers["POST /v1/captions"] = post(client, [("astronaut.jpg", photo)])
    answers["POST /v1/captions (not an image)"] = post(client, [("notes.txt", b"not a picture")])
    assert [r.status_code for r in answers.values()] == [200, 200, 200, 200, 404, 200, 400]
    answers = {url: response.json() for url, response in answers.items()}
    answers["/ and its script"] = [client.get("/").text, client.get("/static/app.js").text]
    return answers


def spice_note(jars: Path) -> str:
    """What `viclip score` notes where SPICE's CoreNLP jars are missing (pipeline/evaluation/spice.py)."""
    return (f"SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar) in {jars}: put the two jars in a folder "
            "and set VICLIP_CORENLP to it (it cannot be fetched offline)")


@pytest.fixture
def leaky(served, demo, tmp_path) -> Served:
    """The demo's service, with a server path wherever a run may write one: a metrics note and the report's notes
    naming the SPICE jars' folder (in pycocoevalcap, or elsewhere), and an LM named by its absolute path (in the
    project)."""
    installed = Path(sysconfig.get_paths()["purelib"]) / "pycocoevalcap/spice/lib"  # where pycocoevalcap keeps them
    report = tmp_path / "compare/comparison.md"
    report.parent.mkdir()
    markdown = served.report.read_text(encoding="utf-8")
    report.write_text(markdown.replace("## Notes\n\n", f"## Notes\n\n- SPICE (syllable): {spice_note(installed)}\n"
                                                      f"- SPICE (word): {spice_note(tmp_path / 'corenlp')}\n"
                                                      f"- Captions: {demo / 'artifacts/metrics/viclipcap.captions.json'}\n"),
                      encoding="utf-8")
    metrics = {name: m and {**m, "notes": {**m.get("notes", {}), "spice": spice_note(installed)}}
               for name, m in served.metrics.items()}
    models = dict(served.models)
    loaded = models["viclipcap"]
    lm = loaded.spec.sections["lm"].model_copy(update={"name": str(demo.resolve() / "models/lm")})
    spec = dataclasses.replace(loaded.spec, sections={**loaded.spec.sections, "lm": lm})
    models["viclipcap"] = dataclasses.replace(loaded, spec=spec)
    return dataclasses.replace(served, models=models, metrics=metrics, report=report)


def test_no_answer_holds_a_server_path(client, leaky, demo, photo_files, tmp_path):
    """A client never learns where the service keeps its files: a path in the project goes out relative to it (as
    params.yaml names it), one in an installed package relative to the packages' folder, any other as …/its name."""
    roots = [demo, demo.resolve(), Path(sys.prefix), Path(__file__).resolve().parents[1], tmp_path]
    photo = photo_files["astronaut.jpg"]
    assert server_paths(every_answer(client, photo), roots) == []
    with TestClient(create_app(leaky)) as leaky_client:
        answers = every_answer(leaky_client, photo)
    assert server_paths(answers, roots) == []
    by_name = {m["model"]: m for m in answers["/v1/models"]["models"]}
    assert {name: m["directory"] for name, m in by_name.items()} == {name: f"artifacts/models/{name}" for name in MODELS}
    assert by_name["viclipcap"]["lm"]["name"] == "models/lm"
    assert by_name["viclipcap"]["test_metrics"]["notes"]["spice"] == spice_note(Path("pycocoevalcap/spice/lib"))
    markdown = answers["/v1/report"]["markdown"]
    assert f"- SPICE (syllable): {spice_note(Path('pycocoevalcap/spice/lib'))}\n" in markdown
    assert f"- SPICE (word): {spice_note(Path('…/corenlp'))}\n" in markdown
    assert "- Captions: artifacts/metrics/viclipcap.captions.json\n" in markdown


def test_the_report_shows_its_chart_through_the_service(client, served):
    """The report's image line links the chart's endpoint, not a file beside the report on the server."""
    report = client.get("/v1/report").json()
    assert re.findall(r"!\[[^\]]*\]\(([^)]*)\)", report["markdown"]) == [report["chart"]] == ["/v1/report/chart"]
    assert client.get(report["chart"]).content.startswith(b"\x89PNG")
    # Without a chart, the line that would show it is left out.
    with TestClient(create_app(dataclasses.replace(served, chart=None))) as client:
        report = client.get("/v1/report").json()
    assert report["chart"] is None and "![" not in report["markdown"] and "| Metric |" in report["markdown"]


def test_a_batcher_job_gives_its_captions_and_their_timings(served, photo_files, reference):
    from pipeline.serve.batcher import JobCaptions, MicroBatcher

    loaded, names = served.models["cnn_lstm"], ["astronaut.jpg", "camera.png"]
    batcher = MicroBatcher({"cnn_lstm": loaded}, window_s=0, max_batch=32, max_queue=256)
    try:
        pixels = torch.stack([loaded.preprocess(open_rgb(io.BytesIO(photo_files[name]))) for name in names])
        result = batcher.submit("cnn_lstm", pixels, served.defaults).result(timeout=60)
    finally:
        batcher.close()
    assert isinstance(result, JobCaptions)
    assert result.texts == [reference["cnn_lstm"][name] for name in names] and result.batch_images == 2
    assert result.model_s > 0 and result.queued_s >= 0


@pytest.mark.parametrize("size, limit, fragment", [
    ((10_000, 10_000), None, "100000000 pixels"),  # Pillow's warning, made an error
    ((20_000, 10_000), None, "200000000 pixels"),  # Pillow's DecompressionBombError, which is no OSError
    ((300, 200), 50_000, "300x200 = 60000 pixels, over the limit of 50000"),
])
def test_open_rgb_checks_the_size_before_decoding(size, limit, fragment):
    with pytest.raises(ImageTooLarge, match=fragment):
        open_rgb(io.BytesIO(bomb(*size)), limit)
    with pytest.raises(BadImage, match="not an image"):
        open_rgb(io.BytesIO(b"GIF89a? no"))
    assert open_rgb(io.BytesIO(bomb(300, 200)), 60_000).mode == "RGB"
