"""viclipcap_scst: self-critical training raises the validation CIDEr of the cross-entropy model it starts
from, learns with the LM untouched, and samples as the model decodes (on its cache, never a banned token)."""

from __future__ import annotations

from contextlib import chdir
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.core import paths
from pipeline.core.io import read_json
from pipeline.data.annotations import ImageRecord
from pipeline.data.datasets import load_splits
from pipeline.data.features import FeatureStore, open_store
from pipeline.decoding.beam import caption_features
from pipeline.decoding.sampling import sample
from pipeline.evaluation.text import protocol_text
from pipeline.models import load_model
from pipeline.training import trainer
from pipeline.training.scst import ImageSet, SelfCritical, advantages
from tests.test_cider import pycocoevalcap_with_corpus_df

CPU = torch.device("cpu")
SCST = "viclipcap_scst"


def test_scst_raises_its_reward_and_keeps_the_best_of_the_start_and_its_epochs(demo, config):
    """SCST optimises the sampled captions' CIDEr-D: the reward rises. Whether the demo's validation CIDEr rises
    too is luck on toy data (float rounding alone turned a gain into none): where it does not, the start is kept."""
    with chdir(demo):
        spec = load_model(paths.model_dir(config, SCST), CPU)[1]
        start = load_model(paths.model_dir(config, "viclipcap"), CPU)[1]
        log = paths.train_log(config, SCST).read_text().splitlines()
    assert spec.training["start_from"]["model"] == "viclipcap"
    assert spec.training["start_from"]["val_loss"] == start.training["val_loss"]
    assert log[0] == "epoch,reward,val_cider,lr,seconds"
    rewards, ciders = ([float(line.split(",")[column]) for line in log[1:]] for column in (1, 2))
    assert rewards[-1] > rewards[0], rewards
    best = max([spec.training["start_val_cider"], *ciders])
    assert spec.training["val_cider"] == best
    assert spec.training["best_epoch"] == ([spec.training["start_val_cider"], *ciders].index(best))
    assert spec.sections == start.sections  # the same model, other weights


def test_scst_trains_the_mapper_alone(demo, config):
    with chdir(demo):
        before = load_file(str(paths.model_dir(config, "viclipcap") / "mapper.safetensors"))
        after = load_file(str(paths.model_dir(config, SCST) / "mapper.safetensors"))
        model, spec = load_model(paths.model_dir(config, SCST), CPU)
    assert set(after) == set(before)
    # Epoch 0, the start, is kept where no epoch beat its validation CIDEr.
    assert any(not torch.equal(before[k], after[k]) for k in before) == (spec.training["best_epoch"] > 0)
    assert spec.fingerprints["lm"] == load_model(demo / paths.model_dir(config, "viclipcap"), CPU)[1].fingerprints["lm"]
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


def test_rewards_count_each_images_own_references_one_or_five():
    """vieCap4H gives most images one reference, KTVIC five: each sample's reward is its CIDEr-D against its
    own image's references, as pycocoevalcap computes it with the training images' document frequencies."""
    texts = ["Một con mèo nằm trên ghế.", "hai người đi trên phố", "một bát phở trên bàn", "một chiếc xe máy đỏ",
             "con chó chạy trên cỏ"]
    records = [ImageRecord(10 + n, Path(f"{n}.jpg"), tuple(texts[n:n + count])) for n, count in enumerate([1, 5, 1, 2])]
    store = FeatureStore(Path("memory"), np.array([13, 12, 11, 10]), {}, rows=np.eye(4, dtype=np.float32))
    data = ImageSet.build(records, store, CPU)
    assert torch.equal(data.features, torch.eye(4)[[3, 2, 1, 0]])  # each image's row, in records' order
    samples = ["một con mèo nằm trên ghế", "hai người đi trên phố", "một chiếc xe", ""]
    images = [0, 1, 3, 2]
    rewards = data.cider.scores(samples, images)
    references = [[protocol_text(c) for c in r.captions] for r in records]
    np.testing.assert_allclose(rewards, pycocoevalcap_with_corpus_df(references, samples, np.array(images)), atol=1e-6)
    assert rewards[0] > rewards[1] > 0 and rewards[3] == 0  # a lone reference matched word for word scores highest


def test_scst_metrics_are_scored_like_the_others(demo, config):
    with chdir(demo):
        metrics = read_json(paths.metrics_path(config, SCST))
        baseline = read_json(paths.metrics_path(config, "viclipcap"))
    assert metrics["images"] == baseline["images"] and metrics["protocol"] == baseline["protocol"]


def test_a_resumed_scst_run_survives_a_change_of_scoring_protocol(tiny_config):
    """The resume checkpoint belongs to the decoding settings SCST validates with, not to the whole score
    section: counting captions otherwise (score.protocol) or writing results elsewhere keeps it."""
    def fingerprint(**score):
        config = tiny_config.model_copy(update={"score": tiny_config.score.model_copy(update=score)})
        return trainer.fingerprint(config, SCST, {}, {"model": "viclipcap"})

    kept = fingerprint()
    assert fingerprint(protocol="word") == kept and fingerprint(out="elsewhere") == kept
    assert fingerprint(beam_size=tiny_config.score.beam_size + 1) != kept


def test_validation_decodes_as_score_does_whatever_the_training_precision(demo, config, monkeypatch):
    """SCST's best epoch is the one whose validation captions, decoded as `viclip score` decodes them (fp32,
    the score settings), score best: under a bf16 training policy too."""
    with chdir(demo):
        model, _ = load_model(paths.model_dir(config, "viclipcap"), CPU)
        data = ImageSet.build(load_splits(config.data)["val"], open_store(paths.store_path(config, "val"), {}), CPU)
    texts = caption_features(model, data.features, config.score, None).texts
    expected = float(data.cider.scores([protocol_text(t) for t in texts], np.arange(len(texts))).mean())
    under_autocast = []
    start_decoding = model.start_decoding
    monkeypatch.setattr(model, "start_decoding", lambda *args: (
        under_autocast.append(torch.is_autocast_enabled("cpu")), start_decoding(*args))[1])
    objective = SelfCritical(model, {"val": data}, config.train.viclipcap_scst, config.score)
    assert objective.validate(model, "bf16") == expected
    assert under_autocast and not any(under_autocast)
