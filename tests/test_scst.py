"""viclipcap_scst: self-critical training raises the validation CIDEr of the cross-entropy model it starts
from, learns with the LM untouched, and samples as the model decodes (on its cache, never a banned token)."""

from __future__ import annotations

from contextlib import chdir

import torch
from safetensors.torch import load_file

from pipeline.core import paths
from pipeline.core.io import read_json
from pipeline.data.features import open_store
from pipeline.decoding.sampling import sample
from pipeline.models import load_model
from pipeline.training.scst import advantages

CPU = torch.device("cpu")
SCST = "viclipcap_scst"


def test_scst_raises_the_validation_cider_of_the_model_it_starts_from(demo, config):
    with chdir(demo):
        spec = load_model(paths.model_dir(config, SCST), CPU)[1]
        start = load_model(paths.model_dir(config, "viclipcap"), CPU)[1]
        log = paths.train_log(config, SCST).read_text().splitlines()
    assert spec.extra["start_from"]["model"] == "viclipcap"
    assert spec.extra["start_from"]["val_loss"] == start.extra["val_loss"]
    assert spec.extra["val_cider"] > spec.extra["start_val_cider"], spec.extra
    assert log[0] == "epoch,reward,val_cider,lr,seconds"
    assert max(float(line.split(",")[2]) for line in log[1:]) == spec.extra["val_cider"]
    assert spec.sections == start.sections  # the same model, other weights


def test_scst_trains_the_mapper_alone(demo, config):
    with chdir(demo):
        before = load_file(str(paths.model_dir(config, "viclipcap") / "mapper.safetensors"))
        after = load_file(str(paths.model_dir(config, SCST) / "mapper.safetensors"))
        model, spec = load_model(paths.model_dir(config, SCST), CPU)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert spec.extra["lm_fingerprint"] == load_model(demo / paths.model_dir(config, "viclipcap"), CPU)[1].extra["lm_fingerprint"]
    assert sorted(p.name for p in (demo / paths.model_dir(config, SCST)).iterdir()) == [
        "config.json", "mapper.safetensors", "params.yaml"]


def test_samples_come_from_the_cache_and_stop(demo, config):
    with chdir(demo):
        model, _ = load_model(paths.model_dir(config, "viclipcap"), CPU)
        features = torch.from_numpy(open_store(paths.store_path(config, "val"), {}).embeddings[:4])
    torch.manual_seed(0)
    tokens, lengths = sample(model, features, 5, 24)
    assert tokens.shape[0] == 20 and lengths.shape == (20,)
    assert not set(tokens.flatten().tolist()) & set(model.banned_ids)
    stopped = [row[: n].tolist() for row, n in zip(tokens, lengths) if model.stop_id in row.tolist()]
    assert stopped and all(row.index(model.stop_id) == len(row) - 1 for row in stopped)  # the stop ends a sample
    # Drawn from the model's own next-token distribution: each sample's log-probability under the
    # teacher-forced model is finite (nothing drawn the model gives zero probability).
    mask = torch.arange(tokens.shape[1]) < lengths[:, None]
    with torch.no_grad():
        nll = model.loss(features.repeat_interleave(5, 0), tokens, mask)
    assert torch.isfinite(nll) and nll < 5


def test_each_sample_is_judged_against_the_others():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    advantage = advantages(rewards)
    assert torch.allclose(advantage[0], torch.tensor([1.0 - 2.5, 2.0 - 2.0, 3.0 - 1.5]))
    assert torch.allclose(advantage.sum(1), torch.zeros(2)) and torch.equal(advantage[1], torch.zeros(3))


def test_scst_metrics_are_scored_like_the_others(demo, config):
    with chdir(demo):
        metrics = read_json(paths.metrics_path(config, SCST))
        baseline = read_json(paths.metrics_path(config, "viclipcap"))
    assert metrics["images"] == baseline["images"] and metrics["protocol"] == baseline["protocol"]
