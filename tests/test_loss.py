"""The chunked cross-entropy through a frozen head equals F.cross_entropy on full logits: the loss, and the
gradients it sends back to the mapper, in fp32 and under autocast, with and without a head bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.core.config import MapperConfig
from pipeline.models.viclipcap import Captioner
from pipeline.models.viclipcap.lm import LanguageModel
from pipeline.models.viclipcap.loss import frozen_head_cross_entropy
from pipeline.models.viclipcap.mapper import build_mapper

VOCAB, WIDTH, EMBEDDING = 500, 32, 16
IGNORE = -100  # F.cross_entropy's label for positions that do not count


def tiny_captioner() -> Captioner:
    """A tiny GPT-2, frozen as load_lm freezes it (head tied to the input embeddings, no bias), whose
    logits spread like a trained LM's rather than random init's near-uniform ones; a tiny mapper."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(20.0)  # logits of standard deviation about 2, not 0.1
    model.requires_grad_(False).eval()
    lm = LanguageModel("tiny", model, tokenizer=None, stop_text=None, stop_id=0, banned_ids=(), max_positions=64)
    mapper = build_mapper(MapperConfig(type="transformer", prefix_length=4, clip_length=3, num_layers=1, num_heads=2),
                          EMBEDDING, WIDTH)
    return Captioner(mapper, lm)


def full_logits_loss(captioner: Captioner, embeddings, tokens, mask) -> torch.Tensor:
    """The plain way: logits over every position, padding labelled IGNORE, F.cross_entropy."""
    prefix = captioner.prefix(embeddings)
    inputs = torch.cat([prefix, captioner.lm.model.get_input_embeddings()(tokens)], dim=1)
    attention = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1).long()
    logits = captioner.lm.model(inputs_embeds=inputs, attention_mask=attention).logits
    logits = logits[:, prefix.shape[1] - 1 : -1]  # (B, T, V): the positions that predict caption tokens
    labels = tokens.masked_fill(~mask, IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six captions of 3 to 11 tokens, right-padded with id 0, which is a real token: only the mask says padding."""
    lengths = torch.tensor([11, 3, 7, 11, 5, 9])
    tokens = torch.randint(VOCAB, (len(lengths), int(lengths.max())), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(tokens.shape[1]) < lengths.unsqueeze(1)
    return torch.randn(len(lengths), EMBEDDING), tokens.masked_fill(~mask, 0), mask


def gradients(captioner: Captioner, loss: torch.Tensor) -> torch.Tensor:
    captioner.mapper.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in captioner.mapper.parameters()])


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def test_the_captioners_loss_and_mapper_gradients_equal_full_logits_in_fp32():
    captioner = tiny_captioner()
    embeddings, tokens, mask = batch()
    ours = captioner.loss(embeddings, tokens, mask)
    ours_grad = gradients(captioner, ours)
    theirs = full_logits_loss(captioner, embeddings, tokens, mask)
    theirs_grad = gradients(captioner, theirs)
    assert ours.dtype == torch.float32 and abs(ours.item() / theirs.item() - 1) < 1e-5
    assert relative(ours_grad, theirs_grad) < 1e-5
    assert not any(p.grad is not None for p in captioner.lm.model.parameters())  # frozen stays frozen
    with torch.no_grad():  # validation: the same loss, and no gradient made for nothing
        assert abs(captioner.loss(embeddings, tokens, mask).item() / theirs.item() - 1) < 1e-5


def test_a_trainable_head_falls_back_to_full_logits_and_gets_its_gradient():
    captioner = tiny_captioner()
    embeddings, tokens, mask = batch()
    frozen = captioner.loss(embeddings, tokens, mask).item()
    head = captioner.lm.model.get_output_embeddings()
    head.requires_grad_(True)
    loss = captioner.loss(embeddings, tokens, mask)
    loss.backward()
    assert abs(loss.item() / frozen - 1) < 1e-5 and head.weight.grad is not None
    with pytest.raises(ValueError, match="trainable"):
        frozen_head_cross_entropy(torch.randn(3, WIDTH), head, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("chunk", [1, 4, 1000])  # one position a chunk, a short last chunk, one chunk
@pytest.mark.parametrize("bias", [False, True])
def test_every_chunking_equals_full_logits_with_or_without_a_head_bias(chunk, bias):
    torch.manual_seed(0)
    head = nn.Linear(WIDTH, VOCAB, bias=bias).requires_grad_(False)
    hidden = (3 * torch.randn(10, WIDTH)).requires_grad_(True)
    targets = torch.randint(VOCAB, (10,))
    ours = frozen_head_cross_entropy(hidden, head, targets, chunk)
    (ours_grad,) = torch.autograd.grad(2 * ours, hidden)  # a scaled loss scales the gradient
    theirs = F.cross_entropy(head(hidden), targets)
    (theirs_grad,) = torch.autograd.grad(2 * theirs, hidden)
    assert abs(ours.item() / theirs.item() - 1) < 1e-5 and relative(ours_grad, theirs_grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_products_take_its_dtype_and_the_loss_stays_fp32(dtype):
    captioner = tiny_captioner()
    embeddings, tokens, mask = batch()
    with torch.autocast("cpu", dtype=dtype):
        ours = captioner.loss(embeddings, tokens, mask)
        theirs = full_logits_loss(captioner, embeddings, tokens, mask)
    ours_grad, theirs_grad = gradients(captioner, ours), gradients(captioner, theirs)
    # Both round the same products to `dtype`: their losses agree to within fp32's rounding (bf16's own
    # error, against an fp32 run, is about 1e-4 here), their gradients to within bf16's (against fp32: 4%).
    assert ours.dtype == torch.float32 and abs(ours.item() / theirs.item() - 1) < 1e-5
    assert relative(ours_grad, theirs_grad) < 0.01
