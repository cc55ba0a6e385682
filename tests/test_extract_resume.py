"""`viclip extract` in chunks: a killed run resumes from its finished chunks, a chunk that cannot be
trusted is encoded again, and two torchrun processes write the very store that one process writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from math import ceil
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.data.chunks
from pipeline.core.config import dump_config, load_config
from pipeline.data.datasets import load_splits
from pipeline.data.features import FeatureStore, open_store
from pipeline.demo.synthetic import make_dataset
from tests.conftest import invoke

VICLIP = [sys.executable, "-m", "pipeline.cli"]
BATCH = 2  # images per batch: small, so that a small split makes many chunks


def edit(project: Path, section: str, params: str = "params.yaml", **values) -> None:
    """Write `params` (in the project): params.yaml with `values` changed in `section`."""
    raw = load_config(project / "params.yaml").model_dump()
    raw[section].update(values)
    (project / params).write_text(dump_config(raw))


def chunked(project: Path) -> None:
    """Batches of two images, a chunk each, decoded in the process; and reference.yaml: the same, but
    four batches a chunk (chunks must not change the numbers), writing under reference/."""
    edit(project, "extract", batch_size=BATCH, chunk_batches=1, num_workers=0)
    edit(project, "extract", "reference.yaml", out="reference", chunk_batches=4)


def store(project: Path, split: str = "train", out: str = "artifacts/features") -> FeatureStore:
    return open_store(project / out / "clip" / f"{split}.h5", {})


def assert_same_store(ours: FeatureStore, theirs: FeatureStore) -> None:
    assert ours.embeddings.dtype == theirs.embeddings.dtype and ours.embeddings.shape == theirs.embeddings.shape
    assert np.array_equal(ours.embeddings, theirs.embeddings)
    assert np.array_equal(ours.image_ids, theirs.image_ids)
    assert ours.attrs == theirs.attrs


def chunk_files(project: Path, split: str = "train") -> list[Path]:
    return sorted((project / "artifacts/features/.chunks/clip" / split).glob("*/*.h5"))


def encoded_by(chunk: Path) -> int:
    """The rank that wrote a chunk file."""
    with h5py.File(chunk, "r") as file:
        return int(file.attrs["rank"])


def train_images(project: Path) -> list[str]:
    return [record.path.name for record in load_splits(load_config(project / "params.yaml").data)["train"]]


def test_a_killed_extract_resumes_from_its_finished_chunks(project, monkeypatch):
    # Enough images (a chunk each) that the kill lands while the split is being encoded.
    shutil.rmtree(project / "ktvic")
    make_dataset(project / "ktvic", 240, 4)
    chunked(project)
    assert invoke("extract", "--split", "train", "--params", "reference.yaml").exit_code == 0
    total = ceil(len(train_images(project)) / BATCH)

    process = subprocess.Popen([*VICLIP, "extract", "--split", "train"], cwd=project,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not chunk_files(project) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    output = "".join(process.communicate())
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{output}"
    kept = len(chunk_files(project))
    assert 1 <= kept < total, f"the kill should land mid-split: {kept} of {total} chunks were written"
    assert not list((project / "artifacts/features").glob("clip/*.h5"))

    # The re-run encodes only the images of the chunks that were not finished.
    encoded = []
    encode_files = pipeline.data.chunks.encode_files

    def counted(encoder, files, *args):  # encode_files, noting the images it is given
        encoded.extend(files)
        return encode_files(encoder, files, *args)

    monkeypatch.setattr(pipeline.data.chunks, "encode_files", counted)
    result = invoke("extract", "--split", "train")
    assert result.exit_code == 0, result.output
    assert f"extract clip train: resuming, {kept} of {total} chunks already done" in result.output.splitlines()
    assert len(encoded) == len(train_images(project)) - kept * BATCH
    assert_same_store(store(project), store(project, out="reference"))
    assert not (project / "artifacts/features/.chunks").exists()


def test_chunks_that_cannot_be_trusted_are_encoded_again(project):
    chunked(project)
    assert invoke("extract", "--split", "train", "--params", "reference.yaml").exit_code == 0
    bad = project / "ktvic/train-images/000003.jpg"
    pixels = bad.read_bytes()
    bad.write_text("not a picture")

    # A run that stops on the bad image keeps its chunks, in a folder of its settings: another run
    # with other settings removes them, keeping its own.
    edit(project, "clip", normalize=False)
    assert invoke("extract", "--split", "train").exit_code == 1
    foreign = [path.read_bytes() for path in chunk_files(project)]
    edit(project, "clip", normalize=True)
    assert invoke("extract", "--split", "train").exit_code == 1
    chunks = chunk_files(project)
    assert len(chunks) == len(foreign) == 6  # 11 train images, 2 a chunk
    assert len({path.parent for path in chunks}) == 1

    # Not to be trusted: the chunk of the image replaced since, a chunk torn in half, a chunk of the
    # other settings, and another chunk of this run under the wrong name.
    bad.write_bytes(pixels)
    replaced = train_images(project).index(bad.name) // BATCH
    torn, other, swapped, source = [index for index in range(6) if index != replaced][:4]
    chunks[torn].write_bytes(chunks[torn].read_bytes()[: chunks[torn].stat().st_size // 2])
    chunks[other].write_bytes(foreign[other])
    shutil.copyfile(chunks[source], chunks[swapped])

    result = invoke("extract", "--split", "train")
    assert result.exit_code == 0, result.output
    assert "extract clip train: resuming, 2 of 6 chunks already done" in result.output.splitlines()
    assert_same_store(store(project), store(project, out="reference"))


@pytest.mark.slow
def test_two_processes_share_the_chunks_and_write_the_one_process_store(project):
    chunked(project)
    (project / "ktvic/train-images/000003.jpg").write_text("not a picture")
    one = invoke("extract", "--split", "train", "--skip-bad-images", "--params", "reference.yaml")
    assert one.exit_code == 0, one.output

    def on_two(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*VICLIP, "extract", "--split", "train", *args], cwd=project, capture_output=True,
                              text=True, env={**os.environ, "VICLIP_NPROC": "2"})

    # Each rank encodes every other chunk; each stops on the bad image, and nothing is written.
    failed = on_two()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    for rank in (0, 1):
        assert f"error: rank {rank}: 1 bad image(s) in train" in failed.stderr
    assert not list((project / "artifacts/features").glob("clip/*.h5"))
    chunks = chunk_files(project)
    assert [encoded_by(path) for path in chunks] == [0, 1, 0, 1, 0, 1]

    # Two chunks lost, one of each rank's: the ranks share out the two, and the main rank writes the store.
    chunks[1].unlink()
    chunks[4].unlink()
    done = on_two("--skip-bad-images")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "extract clip train: resuming, 4 of 6 chunks already done" in done.stdout.splitlines()
    assert_same_store(store(project), store(project, out="reference"))
    assert store(project).attrs["skipped_ids"] == [3]
