"""dvc.yaml is written from the registry (`viclip workflow`): current, short, one branch per model."""

from __future__ import annotations

from pathlib import Path


from pipeline.core.config import yaml_parser
from pipeline.core.registry import MODELS, STORES
from pipeline.workflow import render
from tests.conftest import invoke

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_what_the_registry_writes():
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == render(), "run `viclip workflow`"
    assert len(render().splitlines()) <= 150


def test_every_store_and_model_has_its_stages():
    stages = yaml_parser().load(render())["stages"]
    expected = {*(f"extract_{s}" for s in STORES), *(f"{k}_{m}" for m in MODELS for k in ("train", "score")), "compare"}
    assert set(stages) == expected
    assert stages["train_viclipcap_scst"]["deps"][2] == "${train.out}/${train.viclipcap_scst.start_from}"
    assert stages["train_cnn_lstm"]["plots"] == [{"${train.out}/cnn_lstm.csv": {"x": "epoch", "y": "val_loss",
                                                                                 "cache": False}}]
    assert stages["train_viclipcap_scst"]["plots"][0]["${train.out}/viclipcap_scst.csv"]["y"] == "val_cider"


def test_the_cli_writes_it_and_checks_it(tmp_path):
    path = tmp_path / "dvc.yaml"
    stale = invoke("workflow", "--check", "--path", str(path))
    assert stale.exit_code == 1 and stale.output.strip() == (
        f"error: {path} is not what `viclip workflow` writes from the registry; run it")
    written = invoke("workflow", "--path", str(path))
    assert written.exit_code == 0, written.output
    assert path.read_text(encoding="utf-8") == render()
    assert invoke("workflow", "--check", "--path", str(path)).exit_code == 0
