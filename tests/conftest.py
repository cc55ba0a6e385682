"""One expensive fixture: `viclip demo` run as a user runs it. Its synthetic data, tiny
models, feature stores and trained model are then shared, read-only, by the other tests."""

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

from pipeline.config import Config, dump_config, load_config
from pipeline.demo.synthetic import make_dataset
from pipeline.paths import MODELS

VICLIP = [sys.executable, "-m", "pipeline.cli"]


def viclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user or DVC would."""
    return subprocess.run([*VICLIP, *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    result = viclip("demo", "--workdir", str(workdir), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
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
