"""The load on `viclip serve`: clients on loopback, each sending one image a request, with micro-batching
and with one request at a time (the same service, its batches capped at one request's images).

`python -m benchmarks.load MODELS MODE [PROJECT]` is one case, in a process of its own: it starts the
server in a child process (`... server MODELS MODE PORT [PROJECT]`), so the clients' Python and the
server's do not share one interpreter lock, then runs every concurrency level against it and prints
its JSON. MODELS is `demo` (every trained model of a `viclip demo` project, as `viclip serve --model
all` serves them) or `full` (ViT-B-32 and a GPT-2-small-shaped LM with random weights, the default
mapper: captions run to the full length, the worst case). Each level is bounded in requests and time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from contextlib import chdir
from pathlib import Path

import httpx
import numpy as np

from pipeline.core.registry import MODELS

LEVELS = (1, 8, 32)  # concurrent clients
# Requests at each level: enough rounds for a stable rate on the tiny models, one per client at full size.
REQUESTS = {"demo": {1: 48, 8: 128, 32: 384}, "full": {1: 3, 8: 8, 32: 32}}
LEVEL_LIMIT_S = 150.0  # no new request is sent after this; those in flight are awaited
MAX_LENGTH = 32  # full size: random weights never stop, so every caption is this long (as the decode case)
MODES = ("batched", "single")


def limits(mode: str):
    from pipeline.serve import Limits

    # One request at a time: a batch holds one job (one request's images for one model).
    return Limits() if mode == "batched" else Limits(max_batch=1, batch_window_s=0.0)


class TokenIds:
    """The full-size LM's tokenizer: no GPT-2 vocabulary is at hand offline, and random weights write no
    language anyway, so a caption is its token ids as text (turning ids into text costs next to nothing)."""

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


def served(models: str, project: Path | None):
    from pipeline.core.config import load_config
    from pipeline.core.devices import best_device
    from pipeline.decoding.inference import LoadedModel
    from pipeline.models import ModelSpec
    from pipeline.serve import Served, load_served

    if models == "demo":
        with chdir(project):
            return load_served(load_config("params.yaml"), list(MODELS))
    from benchmarks import workload

    device = best_device()
    captioner = workload.captioner(device)
    captioner.lm.tokenizer = TokenIds()
    loaded = LoadedModel(Path("random-weights"), captioner, ModelSpec("viclipcap", "clip", {}, {"store": {}}, {}),
                         workload.clip_encoder(device), device)
    defaults = workload.params().score.model_copy(update={"max_length": MAX_LENGTH})
    return Served({"viclipcap": loaded}, defaults, {"viclipcap": None})


def run_server(models: str, mode: str, port: int, project: Path | None) -> None:
    import uvicorn

    from pipeline.serve import create_app

    uvicorn.run(create_app(served(models, project), limits(mode)), host="127.0.0.1", port=port, log_level="warning")


def image(models: str, project: Path | None) -> bytes:
    """One image, sent by every request: a test image of the demo's data, or a KTVIC-sized JPEG."""
    if models == "demo":
        return next(iter(sorted((project / "data/ktvic/public-test-images").glob("*.jpg")))).read_bytes()
    from benchmarks import workload
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return workload.write_images(Path(folder), 1)[0].read_bytes()


async def level(url: str, data: bytes, concurrency: int, requests: int) -> dict:
    """`concurrency` clients, each sending its next request when the last is answered, `requests` in all."""
    latencies: list[float] = []
    errors: list[str] = []
    left = iter(range(requests))
    started = time.perf_counter()

    async def client(session: httpx.AsyncClient) -> None:
        for _ in left:
            if time.perf_counter() - started > LEVEL_LIMIT_S:
                return
            sent = time.perf_counter()
            response = await session.post(f"{url}/v1/captions", files={"images": ("image.jpg", data)})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                errors.append(f"{response.status_code} {response.text[:100]}")

    connections = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=connections) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": errors[:5], "error_count": len(errors),
        "seconds": seconds, "requests_per_s": len(latencies) / seconds,
        "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_case(models: str, mode: str, project: Path | None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "server", models, mode, str(port),
                               *([str(project)] if project else [])])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"{url}/healthz").raise_for_status()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the {models} server did not start") from None
                time.sleep(0.5)
        data = image(models, project)
        for _ in range(2):  # warm-up: kernels, allocator, connections
            httpx.post(f"{url}/v1/captions", files={"images": ("image.jpg", data)}, timeout=600).raise_for_status()
        levels = [asyncio.run(level(url, data, c, REQUESTS[models][c])) for c in LEVELS]
        info = httpx.get(f"{url}/v1/models").json()
        return {"models": models, "mode": mode, "served": [m["model"] for m in info["models"]],
                "image_bytes": len(data), "settings": info["defaults"], "levels": levels}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    if sys.argv[1] == "server":
        models, mode, port, *project = sys.argv[2:]
        run_server(models, mode, int(port), Path(project[0]) if project else None)
    else:
        models, mode, *project = sys.argv[1:]
        print(json.dumps(run_case(models, mode, Path(project[0]).resolve() if project else None)))


if __name__ == "__main__":
    main()
