"""Frozen means frozen; the cached batched beam search equals a plain one for both models; training is deterministic."""

from __future__ import annotations

from contextlib import chdir

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core import paths
from pipeline.data.features import open_store

from pipeline.decoding.beam import beam_search
from pipeline.models import load_model
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap.lm import load_lm
from pipeline.models.viclipcap.mapper import build_mapper
from pipeline.training.batches import CaptionSet

CPU = torch.device("cpu")


def test_only_the_mapper_gets_gradients_and_is_saved(demo, config):
    with chdir(demo):
        captioner, spec = load_model("artifacts/models/viclipcap", CPU)
    lm = captioner.lm.model
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert [n for n, _ in captioner.named_parameters()] == [f"mapper.{n}" for n, _ in captioner.mapper.named_parameters()]

    captioner.mapper.train()
    tokens = torch.tensor([captioner.lm.encode(["có một hình tròn màu đỏ ở bên trái"])[0]] * 2)
    loss = captioner.loss(torch.randn(2, spec.store_attrs["embedding_dim"]), tokens, torch.ones_like(tokens, dtype=torch.bool))
    loss.backward()
    assert all(p.grad is not None for p in captioner.mapper.parameters())
    assert all(p.grad is None for p in lm.parameters())

    saved = load_file(str(demo / "artifacts/models/viclipcap/mapper.safetensors"))
    assert set(saved) == set(captioner.mapper.state_dict())


def test_padding_and_prefix_never_reach_the_loss(demo, config):
    with chdir(demo):
        lm = load_lm(config.lm.name, config.lm.stop, CPU)
    torch.manual_seed(0)
    captioner = Captioner(build_mapper(config.mapper, 64, lm.width), lm)
    short, long = lm.encode(["một hình tròn", "có ba hình vuông màu vàng ở bên phải"])
    alone = captioner.loss(torch.ones(1, 64), torch.tensor([short]), torch.ones(1, len(short), dtype=torch.bool))
    padded = torch.full((1, len(long)), 0)  # id 0 is a real token: it must be masked, not skipped by id
    padded[0, : len(short)] = torch.tensor(short)
    mask = torch.arange(len(long)) < len(short)
    assert torch.allclose(alone, captioner.loss(torch.ones(1, 64), padded, mask.unsqueeze(0)), atol=1e-6)


def plain_beam_search(next_logp, eos, beam_size, max_length, length_penalty, banned=()):
    """One image, no cache: next_logp(tokens) re-runs the whole sequence at every step (the reference's way);
    banned tokens are never extended."""
    beams = [([], 0.0, False)]  # (tokens, sum log-prob, finished)
    for _ in range(max_length):
        candidates = []
        for tokens, score, done in beams:
            if done:
                candidates.append((tokens + [eos], score, True, len(tokens[: tokens.index(eos) + 1])))
                continue
            for token, value in enumerate(next_logp(tokens).tolist()):
                if token in banned:
                    continue
                candidates.append((tokens + [token], score + value, token == eos, len(tokens) + 1))
        candidates.sort(key=lambda c: c[1] / c[3] ** length_penalty, reverse=True)
        beams = [(t, s, d) for t, s, d, _ in candidates[:beam_size]]
        if all(d for _, _, d in beams):
            break

    def length(tokens):
        return tokens.index(eos) + 1 if eos in tokens else len(tokens)

    best = max(beams, key=lambda b: b[1] / length(b[0]) ** length_penalty)[0]
    return best[: best.index(eos)] if eos in best else best


def lm_next_logp(captioner, embedding):
    lm, prefix = captioner.lm.model, captioner.prefix(embedding.unsqueeze(0))

    def next_logp(tokens):
        words = lm.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
        return lm(inputs_embeds=torch.cat([prefix, words], 1)).logits[0, -1].float().log_softmax(-1)

    return next_logp


def lstm_next_logp(decoder, features):
    from pipeline.models.cnn_lstm import START

    features = features.unsqueeze(0).float()

    def next_logp(tokens):
        keys, h, c = decoder._begin(features)
        for token in [START, *tokens]:
            logits, h, c, _ = decoder._step(torch.tensor([token]), features, keys, h, c)
        return logits[0].float().log_softmax(-1)

    return next_logp


@torch.inference_mode()
@pytest.mark.parametrize("model", ["viclipcap", "cnn_lstm"])
def test_batched_cached_beam_search_equals_plain_beam_search(demo, config, model):
    with chdir(demo):
        captioner, spec = load_model(f"artifacts/models/{model}", CPU)
        features = torch.from_numpy(open_store(paths.store_path(config, "test", spec.store), {}).embeddings[:6])
    next_logp = lm_next_logp if model == "viclipcap" else lstm_next_logp
    for beam_size, penalty in ((3, 1.0), (2, 0.0)):
        batched = beam_search(captioner, features, beam_size, 12, penalty).tokens
        plain = [
            plain_beam_search(next_logp(captioner, f), captioner.stop_id, beam_size, 12, penalty, captioner.banned_ids)
            for f in features
        ]
        assert batched == plain


def test_training_is_deterministic_for_a_seed(demo, config, tmp_path):
    from pipeline.core.config import parse_config
    from stages import train

    raw = config.model_dump()
    raw["train"]["viclipcap"]["epochs"] = 1
    raw["train"]["out"] = str(tmp_path / "a")
    first = parse_config(raw)
    raw["train"]["out"] = str(tmp_path / "b")
    second = parse_config(raw)
    with chdir(demo):
        train.run(first)
        train.run(second)
    a = load_file(str(tmp_path / "a/viclipcap/mapper.safetensors"))
    b = load_file(str(tmp_path / "b/viclipcap/mapper.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_caption_sets_cut_batches_to_the_longest_caption(demo, config):
    from pipeline.data.datasets import load_splits

    with chdir(demo):
        lm = load_lm(config.lm.name, config.lm.stop, CPU)
        records = load_splits(config.data)["val"]
        store = open_store("artifacts/features/clip/val.h5", {})
    data = CaptionSet.build(records, store, lm.encode, 60, CPU)
    assert len(data) == 5 * len(records)
    encoded = lm.encode([caption for record in records for caption in record.captions])
    for start, (embeddings, tokens, mask, _) in zip(range(0, len(data), 7), data.batches(7)):  # in order, unshuffled
        captions = encoded[start : start + 7]
        assert mask.shape[1] == max(len(c) for c in captions)  # cut to the batch's longest caption
        assert mask.sum(1).tolist() == [len(c) for c in captions]
        assert [row[mask_row].tolist() for row, mask_row in zip(tokens, mask)] == captions  # a prefix of real tokens
        assert embeddings.shape == (len(tokens), store.embeddings.shape[1])
