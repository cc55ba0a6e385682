"""The registry is the one list of stores and models: cheap to import, and every other list follows it. A
variant added by one registration gets its params section, CLI choice, DVC stages and report name; a model
directory keeps what the model is apart from how its training went, and one from before is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.core import registry
from pipeline.core.config import load_config
from pipeline.core.errors import ViclipError
from pipeline.models import read_spec

ROOT = Path(__file__).resolve().parents[1]


def python(script: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_registry_imports_neither_torch_nor_pydantic():
    loaded = python("""
        import sys
        import pipeline.core.registry
        print(sorted(m for m in ("torch", "pydantic", "transformers") if m in sys.modules))
    """)
    assert loaded.strip() == "[]"


def test_a_variant_is_one_registration_and_its_params_section():
    out = python("""
        import json
        from pipeline.core import registry
        registry.MODELS["viclipcap_wide"] = registry.Model(
            "viclipcap_wide", "ViCLIPCap, wide", "viclipcap", "clip", ("clip", "lm", "mapper"))

        from typer.testing import CliRunner
        from pipeline.cli import app
        from pipeline.core.config import parse_config, yaml_parser
        from pipeline.core.errors import ViclipError
        from pipeline.evaluation.report import display_name
        from pipeline.workflow import stages
        raw = yaml_parser().load(open("params.yaml", encoding="utf-8"))
        try:
            parse_config(raw)
            missing = None
        except ViclipError as error:
            missing = str(error)
        raw["train"]["viclipcap_wide"] = raw["train"]["viclipcap"]
        config = parse_config(raw)
        scst = type(config.train.viclipcap_scst).model_fields["start_from"].annotation
        print(json.dumps({
            "missing": missing,
            "lr": config.train.viclipcap_wide.lr,
            "start_from": list(scst.__args__),
            "stages": sorted(s for s in stages() if s.endswith("_wide")),
            "display": display_name("viclipcap_wide"),
            "sections": sorted(registry.model("viclipcap_wide").sections(config)),
            "cli": CliRunner().invoke(app, ["train", "--model", "nope"]).output,
        }))
    """)
    seen = json.loads(out)
    assert seen["missing"] == "params: missing key 'train.viclipcap_wide'"
    assert seen["lr"] > 0
    assert seen["start_from"] == ["viclipcap", "viclipcap_rag", "viclipcap_wide"]
    assert seen["stages"] == ["score_viclipcap_wide", "train_viclipcap_wide"]
    assert seen["display"] == "ViCLIPCap, wide"
    assert seen["sections"] == ["clip", "lm", "mapper"]
    assert seen["cli"].startswith("error: --model must be one of ") and "viclipcap_published, viclipcap_wide," in seen["cli"]


def test_scst_starts_only_from_a_cross_entropy_model_of_its_architecture_and_store():
    assert registry.starting_points("viclipcap_scst") == ("viclipcap", "viclipcap_rag")  # not the baseline, not
    # viclipcap_published, whose store (clip_published) is not SCST's


def test_every_model_is_built_from_its_stores_section():
    """What reloading relies on: the model directory holds the settings its encoder is loaded with."""
    config = load_config(ROOT / "params.yaml")
    for model in registry.MODELS.values():
        assert model.store in registry.STORES and model.store in model.sections(config), model.name


def test_each_model_reads_its_own_sections_and_nothing_rewrites_the_params():
    config = load_config(ROOT / "params.yaml")
    published = registry.model("viclipcap_published").sections(config)
    assert set(published) == {"clip_published", "lm", "mapper"}  # its own store's section, under its own name
    assert published["mapper"] == config.viclipcap_published.mapper
    assert published["lm"].train == config.viclipcap_published.lm_train != config.lm.train
    assert published["lm"].name == config.lm.name
    assert config.lm.train == "frozen" and config.mapper.type == "transformer"  # the params as they were
    assert registry.model("viclipcap_scst").sections(config) == registry.model("viclipcap").sections(config)
    assert set(registry.model("viclipcap_rag").sections(config)) == {"clip", "lm", "mapper", "retrieval"}
    assert registry.model("cnn_lstm").sections(config) == {"cnn": config.cnn, "lstm": config.lstm}


def test_a_model_directory_separates_the_model_from_its_training(demo):
    raw = json.loads((demo / "artifacts/models/viclipcap_published/config.json").read_text())
    assert list(raw) == ["format", "model", "store", "sections", "fingerprints", "training"]
    assert raw["store"] == "clip_published" and set(raw["sections"]) == {"clip_published", "lm", "mapper"}
    assert set(raw["fingerprints"]) == {"store", "lm"}
    assert {"epochs", "best_epoch", "val_loss", "train_seconds", "device", "precision"} <= set(raw["training"])
    spec = read_spec(demo / "artifacts/models/viclipcap_published")
    assert spec.sections["clip_published"].model == "viclip-tiny-vit" and spec.store_attrs["embedding_dim"] == 64


def test_a_model_directory_from_before_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "format": "viclip-model/1", "model": "viclipcap", "encoder": {"encoder": "clip"}, "clip": {}, "lm": {},
        "mapper": {}, "retrieval": None, "epochs": 3}))
    with pytest.raises(ViclipError) as refused:
        read_spec(tmp_path)
    message = str(refused.value)
    assert message == (f"{tmp_path / 'config.json'}: written by an older viclip (viclip-model/1), which this one "
                       "does not read; train it again: viclip train --model viclipcap")


@pytest.mark.parametrize("change, message", [
    ({"model": "lstm"}, "unknown model 'lstm'; one of cnn_lstm, viclipcap,"),
    ({"store": "clip"}, "key 'store': viclipcap_published reads store 'clip_published', not 'clip'"),
    ({"sections": {"lm": {}}}, "missing key 'sections.lm.name'"),
    ({"sections": {}}, "missing key 'sections.clip_published'"),
    ({"fingerprints": {"lm": {}}}, "missing key 'fingerprints.store'"),
])
def test_a_model_directory_that_lacks_what_the_model_is_is_refused_naming_the_key(demo, tmp_path, change, message):
    raw = json.loads((demo / "artifacts/models/viclipcap_published/config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ViclipError) as refused:
        read_spec(tmp_path)
    assert str(refused.value).startswith(str(tmp_path / 'config.json')) and message in str(refused.value), refused.value
