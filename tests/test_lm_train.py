"""lm.train: a frozen LM is left as it was; lora trains adapters alone and full every LM weight, through the
real optimiser and epoch loop; the model directory holds what was trained, reloads to the same captions,
and refuses a base LM with other weights. A tiny GPT-2 built here (tied, padded embeddings), not the demo."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.core.config import parse_config
from pipeline.core.errors import ViclipError
from pipeline.core.io import write_json
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import open_store, write_store
from pipeline.decoding.beam import beam_search
from pipeline.demo import OVERRIDES, demo_params
from pipeline.demo.tiny import make_tiny_lm
from pipeline.models import CONFIG, architecture, build_model, load_model, spec_for
from pipeline.models.base import load_trained_state, trained_state
from pipeline.models.viclipcap.lm import TRAINED_WEIGHTS
from pipeline.training.batches import CaptionSet
from pipeline.training.checkpoint import seed_everything
from pipeline.training.cross_entropy import train_epoch
from pipeline.training.optimisation import Optimisation

CPU = torch.device("cpu")
STORE_ATTRS = {"encoder": "clip", "embedding_dim": 16}
GROUPS = [
    ["có một hình tròn màu đỏ ở bên trái", "một hình tròn màu đỏ", "hình tròn đỏ nằm bên trái"],
    ["có hai hình vuông màu xanh ở bên phải", "hai hình vuông màu xanh", "hình vuông xanh nằm bên phải"],
    ["có ba hình tam giác màu vàng", "ba hình tam giác vàng", "hình tam giác màu vàng ở giữa"],
]


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory) -> Path:
    return make_tiny_lm(GROUPS * 4, tmp_path_factory.mktemp("lm"), steps=20)


def config_for(lm: Path, train: str, **settings):
    raw = demo_params({**OVERRIDES, "mapper": {**OVERRIDES["mapper"], "num_layers": 1}})
    raw["lm"].update(name=str(lm), train=train, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    raw["train"]["viclipcap"].update(batch_size=4, warmup_steps=0, **settings)
    return parse_config(raw)


def captions(model, tmp_path: Path) -> CaptionSet:
    """The groups' captions, one random embedding an image, through a real feature store."""
    records = [ImageRecord(i, tmp_path / f"{i}.jpg", tuple(group)) for i, group in enumerate(GROUPS)]
    with write_store(tmp_path / "train.h5", {"encoder": "clip"}) as store:
        store.append(np.arange(len(records)), np.random.default_rng(0).normal(size=(len(records), 16)))
    return CaptionSet.build(records, open_store(tmp_path / "train.h5", {}), model.encode, model.max_tokens, CPU)


def lm_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.lm.model.named_parameters()}


def train(config, tmp_path: Path, epochs: int = 2):
    """A fresh model trained by the real loop; the optimisation and the LM's weights before training."""
    seed_everything(0)
    model = build_model("viclipcap", config, [], None, STORE_ATTRS, CPU)
    before = lm_weights(model)
    data = captions(model, tmp_path)
    settings = config.train.viclipcap
    optimisation = Optimisation.build(model, settings, epochs * 3, CPU)
    for epoch in range(epochs):
        train_epoch(model, data, settings.batch_size, optimisation, torch.Generator().manual_seed(epoch), "test")
    return model, optimisation, before


def save(model, config, directory: Path) -> Path:
    """The model directory as `viclip train` writes it."""
    directory.mkdir()
    model.save(directory)
    write_json(directory / CONFIG, spec_for("viclipcap", config, model, STORE_ATTRS, {}).to_json())
    return directory


@torch.inference_mode()
def outputs(model, tmp_path: Path):
    """The loss, the first tokens' logits and the beam-searched captions of a fixed batch."""
    model.eval()
    features, tokens, mask, _ = next(captions(model, tmp_path).batches(9))
    first, _ = model.start_decoding(features, 2)
    return model.loss(features, tokens, mask), first, beam_search(model, features, 2, 10, 1.0).tokens


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_trained_lm_is_saved_as_what_was_trained_and_reloads_to_the_same_captions(base_lm, tmp_path, mode):
    config = config_for(base_lm, mode, grad_clip=1.0)  # the clipped step: it too sees only what trains
    model, _, before = train(config, tmp_path)
    after = lm_weights(model)
    trained = {name for name, p in model.lm.model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(before[name], after[name]) for name in trained)
    if mode == "full":
        assert trained == set(before)
    else:
        assert trained and all(".lora_" in name for name in trained)
        assert all(torch.equal(before[name], after[name]) for name in set(before) - trained)
        # The adapters are on the loss's path: the last step's gradients reached every one.
        grads = {name: p.grad for name, p in model.lm.model.named_parameters() if name in trained}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())

    directory = save(model, config, tmp_path / "model")
    assert {p.name for p in directory.iterdir()} == {CONFIG, "mapper.safetensors", TRAINED_WEIGHTS[mode]}
    saved = load_file(directory / TRAINED_WEIGHTS[mode])
    if mode == "full":  # the whole LM, its tied input and output embeddings once
        assert len(saved) == len(trained) and sum(t.numel() for t in saved.values()) == sum(t.numel() for t in after.values())
    else:  # the adapters alone, no copy of the LM
        assert sum(t.numel() for t in saved.values()) == sum(after[name].numel() for name in trained)

    reloaded, spec = load_model(directory, CPU)
    assert spec.sections["lm"].train == mode and spec.fingerprints["lm"]["weights"].startswith("sha256:")
    ours, theirs = outputs(model, tmp_path), outputs(reloaded, tmp_path)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]) and ours[2] == theirs[2]
    fresh = architecture("viclipcap").rebuild(directory, spec.sections, STORE_ATTRS, CPU)  # the base LM, untrained
    fresh.mapper.load_state_dict(model.mapper.state_dict())
    assert not torch.equal(outputs(fresh, tmp_path)[1], ours[1])  # what the LM learned is in the captions

    # A resume checkpoint holds what trains, never a LoRA-adapted LM's frozen base weights.
    state = trained_state(model)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert not frozen & set(state) and bool(frozen) == (mode == "lora")
    load_trained_state(fresh, state)
    assert torch.equal(outputs(fresh, tmp_path)[1], ours[1])


def test_a_frozen_lm_is_left_as_it_was_and_not_saved(base_lm, tmp_path):
    config = config_for(base_lm, "frozen")
    model, _, before = train(config, tmp_path)
    assert all(torch.equal(before[name], weight) for name, weight in lm_weights(model).items())
    assert not model.lm.model.training  # train() left it in eval mode: not a submodule
    assert [n for n, _ in model.named_parameters()] == [f"mapper.{n}" for n, _ in model.mapper.named_parameters()]
    directory = save(model, config, tmp_path / "model")
    assert {p.name for p in directory.iterdir()} == {CONFIG, "mapper.safetensors"}
    # A frozen LM's fingerprint holds no digest of its weights: they are the base LM's, as named.
    assert set(model.record()["lm"]) == {"tokenizer", "config", "embedding_rows", "width", "stop", "stop_id"}


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_the_optimiser_gets_only_what_trains(base_lm, mode):
    model = build_model("viclipcap", config_for(base_lm, mode), [], None, STORE_ATTRS, CPU)
    optimised = {id(p) for group in Optimisation.build(model, config_for(base_lm, mode).train.viclipcap, 10, CPU)
                 .optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    lm = {id(p) for p in model.lm.model.parameters()}
    adapters = {id(p) for name, p in model.lm.model.named_parameters() if ".lora_" in name}
    assert optimised == trainable
    assert optimised & lm == {"frozen": set(), "lora": adapters, "full": lm}[mode]
    # A trained LM follows its captioner into training mode (GPT-2's dropout), a frozen one stays in eval.
    assert model.train().lm.model.training == (mode != "frozen")
    assert not model.eval().lm.model.training


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trained_lm_weights_are_refused_on_another_base_lm(base_lm, tmp_path, mode):
    local = shutil.copytree(base_lm, tmp_path / "lm")
    config = config_for(local, mode)
    directory = save(build_model("viclipcap", config, [], None, STORE_ATTRS, CPU), config, tmp_path / "model")
    # The same path now holds another revision: the same shape and tokenizer, other weights.
    other = AutoModelForCausalLM.from_pretrained(local)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.mul_(1.01)
    other.save_pretrained(local)
    with pytest.raises(ViclipError) as refused:
        load_model(directory, CPU)
    message = str(refused.value)
    assert message.startswith(f"{directory}: trained against another lm: weights was 'sha256:")
    assert "\n" not in message


@pytest.mark.parametrize("change, key", [
    ({"train": "adapters"}, "lm.train"), ({"lora": {"rank": 8, "alpha": 16}}, "lm.lora.dropout"),
    ({"lora": {"rank": 0, "alpha": 16, "dropout": 0.0}}, "lm.lora.rank"),
])
def test_lm_train_settings_are_strict(change, key):
    raw = demo_params()
    raw["lm"].update(change)
    with pytest.raises(ViclipError, match=f"'{key}'"):
        parse_config(raw)
