"""The stages, run by DVC on the synthetic KTVIC folder with tiny local models."""

from __future__ import annotations

import json

from pipeline.config import dump_config, load_config
from pipeline.demo import dvc


def test_demo_runs_all_stages_and_beats_the_blind_baseline(demo):
    out = (demo / "demo.out").read_text()
    for stage in ("extract", "train", "score"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((demo / "artifacts/metrics/viclipcap.json").read_text())
    assert set(metrics) >= {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice"}
    assert metrics["split"] == "test" and metrics["images"] == 80
    assert metrics["spice"] is not None or "CoreNLP" in metrics["notes"]["spice"]

    blind_row = [line for line in out.splitlines() if line.startswith("cider")][-1]  # the demo's final table
    model_cider, blind_cider = (float(x) for x in blind_row.split()[1:])
    assert model_cider == round(metrics["cider"], 4)
    # The trained model must see the image: far above one caption for every image.
    assert model_cider > blind_cider + 1.0, (model_cider, blind_cider)


def test_second_repro_does_nothing(demo_copy):
    out = dvc(demo_copy, "repro")
    assert "Running stage" not in out
    assert "up to date" in out


def test_training_param_change_reruns_only_train_and_score(demo_copy):
    params = load_config(demo_copy / "params.yaml").model_dump()
    params["train"]["epochs"] = 2
    (demo_copy / "params.yaml").write_text(dump_config(params))
    out = dvc(demo_copy, "repro")
    assert "Running stage 'extract'" not in out
    assert "Running stage 'train'" in out and "Running stage 'score'" in out
    log = (demo_copy / "artifacts/models/viclipcap.csv").read_text().splitlines()
    assert log[0] == "epoch,train_loss,val_loss,lr,seconds" and len(log) == 3


def test_outputs_record_what_produced_them(demo):
    model_config = json.loads((demo / "artifacts/models/viclipcap/config.json").read_text())
    assert model_config["lm"] == "models/lm"
    assert model_config["encoder"]["model"] == "viclip-tiny-vit"
    assert model_config["encoder"]["pretrained"].startswith("sha256:")
    assert model_config["mapper"]["type"] == "transformer"
    for folder in ("artifacts/features/clip", "artifacts/models/viclipcap"):
        assert load_config(demo / folder / "params.yaml") == load_config(demo / "params.yaml")
    captions = json.loads((demo / "artifacts/metrics/viclipcap.captions.json").read_text())
    assert len(captions) == 80 and all(set(c) == {"image_id", "caption"} for c in captions)


def test_dvc_shows_the_metrics_and_the_loss_plot(demo_copy):
    metrics = dvc(demo_copy, "metrics", "show")
    assert "cider" in metrics and "bleu_4" in metrics
    dvc(demo_copy, "plots", "show")
    assert "val_loss" in (demo_copy / "dvc_plots/index.html").read_text()
