"""Two session fixtures, each built once for the whole run, however many workers share it:

- `demo`: `viclip demo` run as a user runs it, from an empty folder. Its feature stores, trained models and
  metrics are shared, read-only, by the end-to-end tests. It takes minutes, so it starts in the background
  as soon as a run that collected such a test begins, and those tests come last: the others run meanwhile.
- `tiny`: the demo's synthetic data and tiny models (a tiny CLIP, a random ResNet-18, a tiny GPT-2 and its
  tokenizer), laid out as `viclip demo` lays them out. Tests that need only tiny models take them from here,
  as does the small `project`. Where the demo runs, they are the ones it builds first (about a minute, during
  which the tests that need neither run); else they are built for the run, without running the pipeline.

`make test` runs the suite on two pytest-xdist workers: most tests wait on single-threaded work (a fresh
`viclip` process importing torch, DVC), so two at a time keep both cores busy. Every process of the run,
the background demo included, computes on one thread: three processes of torch's default one thread a
core, on two cores, spin-wait for each other's threads (one test ran 18 times slower than alone)."""

from __future__ import annotations

import os

# Hub look-ups fail at once instead of retrying for a minute: the tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Read by torch when it loads, here and in every process the tests start (which inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import chdir
from pathlib import Path

import pytest
from filelock import FileLock
from typer.testing import CliRunner, Result

from pipeline.cli import app
from pipeline.core.config import Config, dump_config, load_config
from pipeline.core.registry import MODELS
from pipeline.demo import prepare
from pipeline.demo.synthetic import make_dataset

VICLIP = [sys.executable, "-m", "pipeline.cli"]


def viclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user or DVC would."""
    return subprocess.run([*VICLIP, *args], cwd=cwd, capture_output=True, text=True)


def invoke(*args: str) -> Result:
    """Run the CLI in this process (typer's test runner): quicker where a fresh process is not under test."""
    return CliRunner().invoke(app, list(args))


def uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests without the demo first (they run while it builds), and of those the ones without the tiny models
    first (they run while the demo builds those); within each kind the slow ones first (so that the workers'
    last tests are short); file order otherwise."""
    items.sort(key=lambda item: (uses(item, "demo"), uses(item, "tiny"), item.get_closest_marker("slow") is None))


def demo_runs(session: pytest.Session) -> bool:
    return any(uses(item, "demo") for item in session.items)


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """The run's folder that every worker sees (each worker's own base directory sits in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(shared: Path, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `shared/name`, built by `build` in the first worker that needs it; the others wait for it,
    and a failed build fails each of them with its reason."""
    workdir, failed = shared / name, shared / f"{name}.failed"
    with FileLock(shared / f"{name}.lock"):
        if failed.is_file():
            pytest.fail(failed.read_text(), pytrace=False)
        if not (workdir / f"{name}.done").is_file():
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                build(workdir)
            except Exception as error:
                failed.write_text(f"building {name} failed: {error!r}")
                raise
            (workdir / f"{name}.done").touch()
    return workdir


@pytest.fixture(scope="session")
def tiny(request, shared, demo_in_background) -> Path:
    """The demo's data and tiny models: the background demo's folder once they are in it (its params.yaml is
    written after them), or, where no demo runs, a folder of their own."""
    if not demo_runs(request.session):
        return built_once(shared, "tiny", prepare)
    workdir = shared / "demo"
    while not (workdir / "params.yaml").is_file():
        if (workdir / "demo.rc").is_file():
            demo_failed(workdir)
        time.sleep(1)
    return workdir


@pytest.fixture(scope="session", autouse=True)
def demo_in_background(request, shared):
    """Start `viclip demo` once, in the background, where the run has a test that needs it. The worker that
    started it waits for it at the end of its run (or stops it where the run was cut short), so no demo
    outlives the run."""
    if not demo_runs(request.session):
        yield
        return
    workdir = shared / "demo"
    with FileLock(shared / "demo.lock"):
        started = workdir.is_dir()
        if not started:
            workdir.mkdir()
            # The exit status is written last, by rename: its presence says the demo has ended.
            script = '"$@" >demo.out 2>demo.err; echo $? >demo.rc.partial; mv demo.rc.partial demo.rc'
            process = subprocess.Popen(["sh", "-c", script, "sh", *VICLIP, "demo", "--workdir", str(workdir)],
                                       cwd=workdir, start_new_session=True)
    yield
    if not started:
        if request.session.shouldfail or request.session.shouldstop:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        if not (workdir / "demo.rc").is_file():  # stopped with its shell: end the other workers' waits too
            (workdir / "demo.rc").write_text("stopped: the test run was cut short\n")


@pytest.fixture(scope="session")
def demo(shared) -> Path:
    """The demo project, once `viclip demo` (started by `demo_in_background`) has ended well."""
    workdir = shared / "demo"
    while not (workdir / "demo.rc").is_file():
        time.sleep(1)
    if (workdir / "demo.rc").read_text().strip() != "0":
        demo_failed(workdir)
    return workdir


def demo_failed(workdir: Path) -> None:
    output = (workdir / "demo.out").read_text() + (workdir / "demo.err").read_text()
    pytest.fail(f"viclip demo failed:\n{output}", pytrace=False)


@pytest.fixture
def demo_copy(demo, tmp_path) -> Path:
    """A private copy of the demo project, for tests that change it."""
    copy = tmp_path / "project"
    shutil.copytree(demo, copy, symlinks=True)
    return copy


@pytest.fixture
def config(demo) -> Config:
    """The demo's config, with the working directory at the demo project."""
    with chdir(demo):
        yield load_config("params.yaml")


@pytest.fixture
def tiny_config(tiny) -> Config:
    """The tiny models' config (the demo's params), with the working directory at their folder."""
    with chdir(tiny):
        yield load_config("params.yaml")


def make_project(tiny: Path, folder: Path) -> Path:
    """A small project (12 train, 4 test images) in `folder`, using the demo's tiny models, one epoch a model."""
    params = load_config(tiny / "params.yaml").model_dump()
    for section, key in (("clip", "pretrained"), ("clip", "config"), ("clip_published", "pretrained"),
                         ("clip_published", "config"), ("cnn", "weights"), ("lm", "name")):
        params[section][key] = str(tiny / params[section][key])
    params["data"]["root"] = "ktvic"
    for model in MODELS:
        params["train"][model]["epochs"] = 1
    make_dataset(folder / "ktvic", 12, 4)
    (folder / "params.yaml").write_text(dump_config(params))
    return folder


@pytest.fixture
def project(tiny, tmp_path, monkeypatch) -> Path:
    """`make_project` in the test's folder, which is the working directory."""
    monkeypatch.chdir(make_project(tiny, tmp_path))
    return tmp_path
