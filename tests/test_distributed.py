"""Many processes, one result; crash, then resume; stores streamed from disk.

Runs `viclip` as torchrun runs it (2 gloo processes on the CPU, in fp32) against one process, kills
`viclip train` with SIGKILL mid-run and resumes it, and trains from a store read batch by batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import Result

from pipeline.core.config import dump_config, load_config
from pipeline.core.registry import MODELS
from pipeline.demo import dvc
from tests.conftest import VICLIP, invoke

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    """This CPU would pick bf16; the comparisons are in fp32, here and in the processes the tests start."""
    monkeypatch.setenv("VICLIP_PRECISION", "fp32")


def here(*args: str) -> Result:
    """The CLI in this process, where which process runs it is not under test: a fresh one costs seconds."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output + "".join(traceback.format_exception(result.exception))
    return result


def extract(store: str = "clip") -> None:
    """The store the runs below read."""
    here("extract", "--store", store)


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*VICLIP, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*VICLIP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def edit(project: Path, **changes) -> None:
    """edit(project, train__viclipcap__epochs=3): set nested params keys."""
    params = load_config(project / "params.yaml").model_dump()
    for dotted, value in changes.items():
        *sections, key = dotted.split("__")
        target = params
        for section in sections:
            target = target[section]
        target[key] = value
    (project / "params.yaml").write_text(dump_config(params))


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(model_dir / "mapper.safetensors"))


def val_losses(log: Path) -> list[float]:
    return [float(line.split(",")[2]) for line in log.read_text().splitlines()[1:]]


def test_two_processes_train_and_score_as_one(project):
    """Trained on two 'machines' of one process each, by README's command for several machines (VICLIP_NPROC's
    launcher trains SCST on two in the DVC test below, and scores here); scored on two by VICLIP_NPROC."""
    # 55 training captions in batches of 27: the last batch is one caption, so one rank's share is empty.
    edit(project, train__viclipcap__epochs=3, train__viclipcap__batch_size=27, score__batch_size=1)
    extract()
    here("train")  # the one-process reference, in this process: compared below to float tolerance
    here("score")  # its captions, which the two-process score must reproduce byte for byte
    one = {name: (project / "artifacts" / name).read_bytes() for name in
           ("models/viclipcap/mapper.safetensors", "models/viclipcap.csv", "metrics/viclipcap.captions.json")}
    one_spec = json.loads((project / "artifacts/models/viclipcap/config.json").read_text())
    one_metrics = json.loads((project / "artifacts/metrics/viclipcap.json").read_text())

    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"localhost:{_free_port()}", "--rdzv-id", uuid.uuid4().hex, "-m", "pipeline.cli", "train"]
    machines = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs
    assert sum(out.count("train viclipcap:") for out, _ in outputs) == 1  # rank 0 alone prints
    spec = json.loads((project / "artifacts/models/viclipcap/config.json").read_text())
    assert spec["training"]["processes"] == 2 and one_spec["training"]["processes"] == 1
    assert spec["training"]["val_loss"] == pytest.approx(one_spec["training"]["val_loss"], rel=1e-5)
    assert val_losses(project / "artifacts/models/viclipcap.csv") == pytest.approx(
        [float(line.split(",")[2]) for line in one["models/viclipcap.csv"].decode().splitlines()[1:]], rel=1e-5)
    ours = weights(project / "artifacts/models/viclipcap")
    (project / "one.safetensors").write_bytes(one["models/viclipcap/mapper.safetensors"])
    theirs = load_file(str(project / "one.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key], theirs[key]
        if key.endswith("in_proj_bias"):
            # The key projection's bias has no gradient in exact arithmetic (softmax ignores a shift of
            # every score); Adam turns its rounding noise into steps of the learning rate's size.
            width = len(a) // 3
            a, b = np.delete(a, np.s_[width : 2 * width]), np.delete(b, np.s_[width : 2 * width])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=key)

    # Score the one-process model on two processes: the same captions, the same metrics.
    (project / "artifacts/models/viclipcap/mapper.safetensors").write_bytes(one["models/viclipcap/mapper.safetensors"])
    scored = run("score", env={"VICLIP_NPROC": "2"})
    assert scored.stdout.count("score viclipcap") == 1
    assert (project / "artifacts/metrics/viclipcap.captions.json").read_bytes() == one["metrics/viclipcap.captions.json"]
    metrics = json.loads((project / "artifacts/metrics/viclipcap.json").read_text())
    assert metrics["cider"] == one_metrics["cider"] and metrics["bleu_4"] == one_metrics["bleu_4"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_dvc_repro_on_two_processes_reruns_nothing_and_runs_a_stage_on_two(demo_copy, monkeypatch):
    monkeypatch.delenv("VICLIP_PRECISION")  # nothing is compared here: this CPU's own policy, as DVC runs it
    monkeypatch.setenv("VICLIP_NPROC", "2")
    assert "Running stage" not in dvc(demo_copy, "repro")  # the number of processes is not a param
    # SCST: each rank samples for its share of a batch's images, every rank validates.
    out = dvc(demo_copy, "repro", "--force", "--single-item", "train_viclipcap_scst")
    assert "Running stage 'train_viclipcap_scst'" in out
    spec = json.loads((demo_copy / "artifacts/models/viclipcap_scst/config.json").read_text())
    assert spec["training"]["processes"] == 2 and spec["training"]["start_from"]["model"] == "viclipcap"
    assert len((demo_copy / "artifacts/models/viclipcap_scst.csv").read_text().splitlines()) == 1 + spec["training"]["epochs"]


def _kill_after_checkpoint(process: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL once the first epoch's checkpoint exists; the run must not have finished by then."""
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_train_resumes_after_sigkill_and_ends_as_an_uninterrupted_run(project):
    # Cross-entropy, then SCST from its model (whose first validation, of the starting model, the checkpoint keeps).
    edit(project, train__viclipcap__epochs=30, train__viclipcap__patience=30,
         train__viclipcap_scst__epochs=6, train__viclipcap_scst__patience=6)  # an SCST epoch samples: longer
    extract()
    for model, epochs in (("viclipcap", 30), ("viclipcap_scst", 6)):
        run("train", "--model", model)
        model_dir, checkpoint = project / f"artifacts/models/{model}", project / f"artifacts/models/.{model}.resume.pt"
        uninterrupted = (model_dir / "mapper.safetensors").read_bytes()
        spec = json.loads((model_dir / "config.json").read_text())
        log = [line.rsplit(",", 1)[0] for line in (project / f"artifacts/models/{model}.csv").read_text().splitlines()]
        assert not checkpoint.exists()  # a finished run leaves none behind

        # As DVC does before running the stage: the outputs are gone.
        for path in (model_dir / "mapper.safetensors", model_dir / "config.json", model_dir / "params.yaml"):
            path.unlink()
        model_dir.rmdir()
        _kill_after_checkpoint(start("train", "--model", model), checkpoint)
        assert not model_dir.exists(), "the run finished before it was killed: nothing was tested"

        resumed = run("train", "--model", model)
        assert "resuming after epoch" in resumed.stderr
        assert int(resumed.stderr.split("resuming after epoch ")[1].split()[0]) < epochs
        assert (model_dir / "mapper.safetensors").read_bytes() == uninterrupted
        again = [line.rsplit(",", 1)[0] for line in (project / f"artifacts/models/{model}.csv").read_text().splitlines()]
        assert again == log  # every epoch's figures and learning rate, to the last digit
        resumed_spec = json.loads((model_dir / "config.json").read_text())
        for recorded in (resumed_spec, spec):
            del recorded["training"]["train_seconds"]
        assert resumed_spec == spec
        assert not checkpoint.exists()


def test_a_checkpoint_of_other_settings_is_ignored(project):
    edit(project, train__viclipcap__epochs=30, train__viclipcap__patience=30)
    extract()
    checkpoint = project / "artifacts/models/.viclipcap.resume.pt"
    _kill_after_checkpoint(start("train"), checkpoint)

    edit(project, train__viclipcap__lr=1e-3, train__viclipcap__epochs=2)
    other = here("train")
    assert "checkpoint of other settings, data or code, ignored" in other.stderr
    assert "resuming" not in other.stderr
    fresh = (project / "artifacts/models/viclipcap/mapper.safetensors").read_bytes()
    here("train")
    assert (project / "artifacts/models/viclipcap/mapper.safetensors").read_bytes() == fresh

    checkpoint.write_bytes(b"not a checkpoint")
    garbage = here("train")
    assert "unreadable checkpoint ignored" in garbage.stderr
    assert (project / "artifacts/models/viclipcap/mapper.safetensors").read_bytes() == fresh


# In a copy of the sources: the code digest as training takes it, then after editing code training never
# loads, then after editing code it runs.
DIGESTS = """
import sys
from pathlib import Path
import stages.train
from pipeline.training.checkpoint import code_digest
root = Path(sys.argv[1])
digests = [code_digest()]
for edited in ("pipeline/serve/app.py", "pipeline/evaluation/report.py", "pipeline/training/optimisation.py"):
    with open(root / edited, "a") as source:
        source.write("# edited\\n")
    digests.append(code_digest())
print(*digests)
"""


def test_a_checkpoint_belongs_to_the_code_training_runs(tmp_path):
    """Editing the service or the report keeps a half-finished run's checkpoint; editing training's code does not."""
    root = Path(__file__).resolve().parents[1]
    for package in ("pipeline", "stages"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-c", DIGESTS, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    start, after_serve, after_report, after_training = result.stdout.split()
    assert start == after_serve == after_report
    assert after_training != start


def _rank_pid(marker: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"VICLIP_TEST_MARKER={marker}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_run_with_an_error_not_a_hang(project):
    edit(project, train__viclipcap__epochs=200, train__viclipcap__patience=200)
    extract()
    marker = uuid.uuid4().hex
    process = start("train", env={"VICLIP_NPROC": "2", "VICLIP_TEST_MARKER": marker})
    checkpoint = project / "artifacts/models/.viclipcap.resume.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() or _rank_pid(marker, 1) is None:  # both ranks are training
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.kill(_rank_pid(marker, 1), signal.SIGKILL)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run hung after a rank died")
    assert process.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        "error: viclip train on 2 processes failed: rank 1 was killed by SIGKILL, and the launcher stopped the others")
    assert not (project / "artifacts/models/viclipcap").exists()


@pytest.mark.parametrize("model", ["viclipcap", "cnn_lstm"])
def test_a_store_over_the_memory_budget_is_streamed_with_the_same_result(project, model, monkeypatch):
    edit(project, **{f"train__{model}__epochs": 2})
    extract(MODELS[model].store)
    here("train", "--model", model)
    in_memory = (project / "artifacts/models" / model).glob("*.safetensors")
    in_memory = {p.name: p.read_bytes() for p in in_memory}
    monkeypatch.setenv("VICLIP_FEATURE_BUDGET_MB", "0")
    result = here("train", "--model", model)
    assert "over the memory budget, read from disk batch by batch" in result.stderr
    streamed = {p.name: p.read_bytes() for p in (project / "artifacts/models" / model).glob("*.safetensors")}
    assert streamed == in_memory
