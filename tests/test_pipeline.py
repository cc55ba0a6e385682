"""The stages, run by DVC on the synthetic KTVIC folder with tiny local models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.config import DECODING, dump_config, load_config, yaml_parser
from pipeline.core.registry import MODELS, STORES
from pipeline.data.datasets import load_splits
from pipeline.demo import dvc

ROOT = Path(__file__).resolve().parents[1]

STAGES = (*(f"extract_{e}" for e in STORES), *(f"train_{m}" for m in MODELS), *(f"score_{m}" for m in MODELS), "compare")
# What a change of each model's training settings re-runs: the model, and the models that start from it.
RERUN = {"viclipcap", "viclipcap_scst"}  # viclipcap's training params changed: its branch and SCST's, which starts from it


def test_demo_runs_every_branch_and_every_model_beats_the_blind_baseline(demo):
    out = (demo / "demo.out").read_text()
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    for model in MODELS:
        metrics = json.loads((demo / f"artifacts/metrics/{model}.json").read_text())
        assert set(metrics) >= {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice"}
        assert metrics["split"] == "test" and metrics["images"] == 80
        assert metrics["spice"] is not None or "CoreNLP" in metrics["notes"]["spice"]

    # The demo's final tables, one per protocol, each labelled.
    for protocol in ("syllable", "word"):
        table = out.split(f"\n{protocol} protocol: ")[-1].split("metric ")[1]
        header, *rows = [line.split() for line in table.splitlines()[:9]]
        assert header == ["cnn_lstm", "viclipcap", "viclipcap_rag", "viclipcap_scst", "viclipcap_published", "blind"]
        cider = dict(zip(header, (float(x) for x in next(r for r in rows if r[0] == "cider")[1:])))
        # Each trained model must see the image: well above one caption for every image. (Retrieval is the
        # weakest on this toy data: the tiny LM copies the retrieved captions' counts and colours.)
        for model in MODELS:
            assert cider[model] > cider["blind"] + 0.5, (protocol, model, cider)
    assert "ablation: what each model trains and what it cost" in out and "| Model | Encoder | LM |" in out


def test_second_repro_does_nothing(demo_copy):
    out = dvc(demo_copy, "repro")
    assert "Running stage" not in out
    assert "up to date" in out


def test_a_models_training_params_are_a_param_of_its_training_alone():
    """For every model, what the next test runs DVC to show for one: `train.<model>` is a param of that model's
    training stage and of no other stage (what starts from the model re-runs through its deps on the model)."""
    stages = yaml_parser().load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for model in MODELS:
        readers = {name for name, stage in stages.items() for key in stage.get("params", [])
                   if key in ("train", f"train.{model}") or key.startswith(f"train.{model}.")}
        assert readers == {f"train_{model}"}, model


def test_scst_training_reads_the_decoding_settings_not_the_whole_score_section():
    """SCST picks its best epoch by validation captions decoded with the score settings: those are its params;
    how captions are counted (score.protocol) and where results go (score.out) are not."""
    stages = yaml_parser().load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    read = [key for key in stages["train_viclipcap_scst"]["params"] if key.split(".")[0] == "score"]
    assert sorted(read) == sorted(f"score.{key}" for key in DECODING)


@pytest.mark.slow
def test_changing_the_scoring_protocol_rescores_without_retraining(demo_copy):
    params = load_config(demo_copy / "params.yaml").model_dump()
    params["score"]["protocol"] = "syllable"
    (demo_copy / "params.yaml").write_text(dump_config(params))
    changed = dvc(demo_copy, "status")
    assert "score_viclipcap_scst" in changed and "train_" not in changed, changed


@pytest.mark.slow
def test_one_models_training_params_rerun_only_its_branch(demo_copy):
    """viclipcap's, whose branch cascades (SCST starts from it); the test above shows that every model's training
    params are its training stage's alone, so that each other branch reruns alone as well."""
    params = load_config(demo_copy / "params.yaml").model_dump()
    params["train"]["viclipcap"]["epochs"] = 1
    (demo_copy / "params.yaml").write_text(dump_config(params))
    out = dvc(demo_copy, "repro")
    assert "Running stage 'extract" not in out
    for other in set(MODELS) - RERUN:
        assert f"Running stage 'train_{other}'" not in out and f"Running stage 'score_{other}'" not in out
    for rerun in RERUN:
        assert f"Running stage 'train_{rerun}'" in out and f"Running stage 'score_{rerun}'" in out
    assert "Running stage 'compare'" in out
    log = (demo_copy / "artifacts/models/viclipcap.csv").read_text().splitlines()
    assert log[0] == "epoch,train_loss,val_loss,lr,seconds" and len(log) == 2


def test_outputs_record_what_produced_them(demo):
    model_config = json.loads((demo / "artifacts/models/viclipcap/config.json").read_text())
    assert model_config["sections"]["lm"] == load_config(demo / "params.yaml").lm.model_dump()
    assert model_config["sections"]["lm"]["name"] == "models/lm" and model_config["sections"]["lm"]["train"] == "frozen"
    assert model_config["fingerprints"]["lm"]["stop"] == "." and model_config["training"]["precision"]
    published = demo / "artifacts/models/viclipcap_published"  # its LM trained: full, saved beside the mapper
    recorded = json.loads((published / "config.json").read_text())
    assert recorded["sections"]["lm"]["train"] == "full" and recorded["fingerprints"]["lm"]["weights"].startswith("sha256:")
    assert {p.name for p in published.glob("*.safetensors")} == {"mapper.safetensors", "lm.safetensors"}
    assert model_config["fingerprints"]["store"]["model"] == "viclip-tiny-vit"
    assert model_config["fingerprints"]["store"]["pretrained"].startswith("sha256:")
    assert model_config["sections"]["mapper"]["type"] == "transformer"
    baseline = json.loads((demo / "artifacts/models/cnn_lstm/config.json").read_text())
    assert baseline["fingerprints"]["store"]["encoder"] == "cnn" and baseline["fingerprints"]["store"]["weights"].startswith("sha256:")
    assert baseline["sections"]["lstm"] == load_config(demo / "params.yaml").lstm.model_dump()
    for folder in ("artifacts/features/clip", "artifacts/features/cnn", "artifacts/models/viclipcap",
                   "artifacts/models/cnn_lstm"):
        assert load_config(demo / folder / "params.yaml") == load_config(demo / "params.yaml")
    for model in ("viclipcap", "cnn_lstm"):
        captions = json.loads((demo / f"artifacts/metrics/{model}.captions.json").read_text())
        assert len(captions) == 80 and all(set(c) == {"image_id", "file_name", "caption"} for c in captions)
        test = {r.image_id: r.path.name for r in load_splits(load_config(demo / "params.yaml").data.model_copy(
            update={"root": str(demo / "data/ktvic")}))["test"]}
        assert {c["image_id"]: c["file_name"] for c in captions} == test
    assert {json.loads((demo / f"artifacts/metrics/{m}.json").read_text())["dataset"] for m in MODELS} == {"KTVIC"}


def test_dvc_shows_both_metrics_files_the_loss_plots_and_the_chart(demo_copy):
    metrics = dvc(demo_copy, "metrics", "show")
    assert "viclipcap.json" in metrics and "cnn_lstm.json" in metrics and "cider" in metrics
    dvc(demo_copy, "plots", "show")
    page = (demo_copy / "dvc_plots/index.html").read_text()
    assert "val_loss" in page and "comparison.png" in page
