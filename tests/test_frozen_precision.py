"""The frozen LM's weights held in half precision on a GPU (forced here on the CPU): which dtype, which weights,
losses and captions near the fp32-weight path, trained weights left in fp32, and fp16's fall-back to fp32."""

from __future__ import annotations

from contextlib import chdir

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.core import devices, paths
from pipeline.core.config import LoraSettings, MapperConfig
from pipeline.core.errors import ViclipError
from pipeline.data.datasets import load_splits
from pipeline.data.features import open_store
from pipeline.decoding.beam import beam_search
from pipeline.models import load_model
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap.lm import LanguageModel, hold, load_lm
from pipeline.models.viclipcap.mapper import build_mapper
from pipeline.training.batches import CaptionSet
from pipeline.training.cross_entropy import evaluate

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OVERRIDE = "VICLIP_FROZEN_PRECISION"
NEAR_TIE = 0.15  # nats a token: the CUDA tests' margin (tests/gpu/test_cuda.py)
LORA = LoraSettings(rank=4, alpha=8, dropout=0.0)
MAPPER = MapperConfig(type="transformer", prefix_length=4, clip_length=2, num_layers=1, num_heads=2)


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    for variable in ("VICLIP_PRECISION", OVERRIDE):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("capability, dtype", [
    ((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16), ((6, 0), torch.float32),
])
def test_a_gpu_holds_frozen_weights_in_its_policys_precision(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert devices.frozen_dtype(CUDA) == dtype


def test_a_cpu_holds_fp32_even_with_native_bf16_unless_told(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    assert devices.precision(CPU) == "bf16" and devices.frozen_dtype(CPU) == torch.float32
    monkeypatch.setenv(OVERRIDE, "fp16")
    assert devices.frozen_dtype(CPU) == torch.float16
    monkeypatch.setenv(OVERRIDE, "half")
    with pytest.raises(ViclipError, match=rf"^{OVERRIDE}='half': expected one of bf16, fp16, fp32$"):
        devices.frozen_dtype(CPU)


def test_held_bf16_weights_keep_losses_and_captions_near_the_fp32_path(demo, config, monkeypatch):
    """The tolerances the CUDA tests hold a GPU to: validation loss within 1%; at least 95% of the captions the
    same, or a near tie: within NEAR_TIE nats a token of the fp32 caption, under the fp32 model. The demo's
    captions are templates of near-equal probability (bf16 left 84% of them identical, the rest near ties)."""
    with chdir(demo):
        fp32, spec = load_model("artifacts/models/viclipcap", CPU)
        monkeypatch.setenv(OVERRIDE, "bf16")
        bf16, _ = load_model("artifacts/models/viclipcap", CPU)
        val = CaptionSet.build(load_splits(config.data)["val"], open_store(paths.store_path(config, "val", spec.store), {}),
                               fp32.encode, fp32.max_tokens, CPU)
        features = torch.from_numpy(open_store(paths.store_path(config, "test", spec.store), {}).embeddings[:])
    held = {name: p.dtype for name, p in bf16.lm.model.named_parameters()}
    assert {d for n, d in held.items() if "ln_" in n} == {torch.float32}  # norms normalise in fp32
    assert {d for n, d in held.items() if "ln_" not in n} == {torch.bfloat16}
    assert not any(p.requires_grad for p in bf16.lm.model.parameters())

    losses = [evaluate(model, val, 16, "fp32") for model in (fp32, bf16)]
    assert abs(losses[1] / losses[0] - 1) < 0.01, losses
    ours, theirs = (beam_search(model, features, 3, 20, 1.0).tokens for model in (fp32, bf16))
    gaps = [token_loss(fp32, features[row], b) - token_loss(fp32, features[row], a)
            for row, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    agree = 1 - sum(gap > NEAR_TIE for gap in gaps) / len(features)
    assert agree >= 0.95 and len(gaps) < len(features) / 2, (agree, gaps)


@torch.no_grad()
def token_loss(model: Captioner, embedding: torch.Tensor, caption: list[int]) -> float:
    """Mean negative log-likelihood a token of `caption` (its stop included), as beam search ranks it."""
    tokens = torch.tensor([caption + [model.stop_id]])
    return model.loss(embedding[None], tokens, torch.ones_like(tokens, dtype=torch.bool)).item()


def test_lora_adapters_train_in_fp32_over_held_bf16_weights(tiny, monkeypatch):
    monkeypatch.setenv(OVERRIDE, "bf16")
    lm = load_lm(str(tiny / "models/lm"), ".", CPU, "lora", LORA)
    adapters = {n: p for n, p in lm.model.named_parameters() if "lora_" in n}
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    frozen = [p for n, p in lm.model.named_parameters() if "lora_" not in n and "ln_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)

    captioner = Captioner(build_mapper(MAPPER, 16, lm.width), lm)
    tokens = torch.tensor(lm.encode(["một hình tròn màu đỏ"]))
    captioner.loss(torch.randn(1, 16), tokens, torch.ones_like(tokens, dtype=torch.bool)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())


def overflowing_captioner() -> Captioner:
    """A tiny GPT-2 whose first block writes activations past fp16's largest value (65,504): finite in fp32,
    where the final layer norm brings them back, and inf in fp16."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(300)
        model.transformer.h[0].mlp.c_proj.weight.mul_(1e4)
    model.requires_grad_(False).eval()
    lm = LanguageModel("tiny", model, tokenizer=None, stop_text=None, stop_id=0, banned_ids=(), max_positions=32)
    return Captioner(build_mapper(MAPPER, 16, 32), lm)


def test_an_fp16_overflow_on_the_first_batch_puts_fp32_weights_back_in_one_line(capsys):
    reference, held = overflowing_captioner(), overflowing_captioner()
    original = {n: p.clone() for n, p in reference.lm.model.named_parameters()}
    held.lm.held, held.lm.originals = torch.float16, hold(held.lm.model, torch.float16)
    assert held.lm.model.transformer.h[0].mlp.c_proj.weight.dtype == torch.float16
    embeddings, tokens = torch.randn(3, 16), torch.randint(300, (3, 6))
    mask = torch.ones_like(tokens, dtype=torch.bool)

    loss = held.loss(embeddings, tokens, mask)  # the first batch overflows, and runs again in fp32
    assert torch.isfinite(loss) and torch.equal(loss, reference.loss(embeddings, tokens, mask))
    assert all(torch.equal(p, original[n]) for n, p in held.lm.model.named_parameters())  # the originals, not a round trip
    assert capsys.readouterr().err == ("lm: tiny overflowed in fp16 on the first batch (inf or NaN); its weights are "
                                       "held and run in fp32 for this run\n")
    with torch.autocast("cpu", dtype=torch.float16):  # a caller's fp16 policy no longer reaches the LM
        assert torch.isfinite(held.loss(embeddings, tokens, mask))
    assert beam_search(held, embeddings, 2, 5, 1.0) == beam_search(reference, embeddings, 2, 5, 1.0)
    assert capsys.readouterr().err == ""  # checked once a run


def test_an_fp16_first_decoding_batch_that_overflows_decodes_in_fp32_and_then_trains(capsys):
    """The first batch can be a validation decode (SCST's), under inference mode: the fp32 weights it puts back
    must still serve a backward afterwards."""
    reference, held = overflowing_captioner(), overflowing_captioner()
    held.lm.held, held.lm.originals = torch.float16, hold(held.lm.model, torch.float16)
    held.lm.model.requires_grad_(False)
    embeddings = torch.randn(3, 16)
    assert beam_search(held, embeddings, 2, 5, 1.0) == beam_search(reference, embeddings, 2, 5, 1.0)
    assert "overflowed in fp16" in capsys.readouterr().err
    tokens = torch.randint(300, (3, 6))
    held.loss(embeddings, tokens, torch.ones_like(tokens, dtype=torch.bool)).backward()
    assert all(p.grad is not None for p in held.mapper.parameters())


def test_an_fp16_fall_back_under_lora_puts_back_the_weights_the_adapters_wrap(tiny, monkeypatch, capsys):
    fp32 = {n: p.detach().clone() for n, p in load_lm(str(tiny / "models/lm"), ".", CPU, "lora", LORA).model.named_parameters()}
    monkeypatch.setenv(OVERRIDE, "fp16")
    lm = load_lm(str(tiny / "models/lm"), ".", CPU, "lora", LORA)
    assert lm.originals and not lm.settled(torch.tensor(float("nan")))  # as if the first batch overflowed
    assert "overflowed in fp16" in capsys.readouterr().err
    after = dict(lm.model.named_parameters())
    assert all(torch.equal(after[n], weight) for n, weight in fp32.items() if "lora_" not in n)
