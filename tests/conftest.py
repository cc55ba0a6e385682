"""One expensive fixture: `viclip demo` run as a user runs it. Its synthetic data, tiny
models, feature stores and trained model are then shared, read-only, by the other tests.

`make test` runs the suite on two pytest-xdist workers: most tests wait on single-threaded work
(a fresh `viclip` process importing torch, DVC), so two at a time keep both cores busy. The demo
is built once for both, and the tests that do not need it run first, while it builds."""

from __future__ import annotations

import os

# Hub look-ups fail at once instead of retrying for a minute: the tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import shutil
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import pytest
from filelock import FileLock

from pipeline.core.config import Config, dump_config, load_config
from pipeline.core.names import MODELS
from pipeline.demo.synthetic import make_dataset

VICLIP = [sys.executable, "-m", "pipeline.cli"]


def viclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user or DVC would."""
    return subprocess.run([*VICLIP, *args], cwd=cwd, capture_output=True, text=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests without the demo first (they run while it builds), the slow ones of each kind first (so that the
    workers' last tests are short); file order otherwise."""
    items.sort(key=lambda item: ("demo" in getattr(item, "fixturenames", ()), item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The demo project, built by the first worker that needs it; the others wait for it (or its failure)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # each worker's base directory sits in the run's
    workdir, failed = shared / "demo", shared / "demo.failed"
    with FileLock(shared / "demo.lock"):
        if failed.is_file():
            pytest.fail(failed.read_text(), pytrace=False)
        if not (workdir / "demo.out").is_file():
            workdir.mkdir()
            result = viclip("demo", "--workdir", str(workdir), cwd=workdir)
            if result.returncode != 0:
                failed.write_text(f"viclip demo failed:\n{result.stdout}{result.stderr}")
                pytest.fail(failed.read_text(), pytrace=False)
            (workdir / "demo.out").write_text(result.stdout)
    return workdir


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
def project(demo, tmp_path, monkeypatch) -> Path:
    """A small project (12 train, 4 test images) using the demo's tiny models, in the working directory."""
    params = load_config(demo / "params.yaml").model_dump()
    for section, key in (("clip", "pretrained"), ("clip", "config"), ("clip_published", "pretrained"),
                         ("clip_published", "config"), ("cnn", "weights"), ("lm", "name")):
        params[section][key] = str(demo / params[section][key])
    params["data"]["root"] = "ktvic"
    for model in MODELS:
        params["train"][model]["epochs"] = 1
    make_dataset(tmp_path / "ktvic", 12, 4)
    (tmp_path / "params.yaml").write_text(dump_config(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path
