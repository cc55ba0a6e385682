"""The GPU's training and decoding steps, run on the CPU: static batch widths, a `torch.compile`d step against
the eager one, fused AdamW across the warm-up, and which paths compile."""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

from pipeline.core import devices
from pipeline.core.config import TrainSettings
from pipeline.core.errors import ViclipError
from pipeline.decoding.beam import beam_search
from pipeline.training import optimisation
from pipeline.training.batches import STATIC_WIDTH, CaptionSet
from pipeline.training.cross_entropy import CrossEntropy
from pipeline.training.optimisation import Optimisation
from tests.test_loss import EMBEDDING, VOCAB, tiny_captioner

CPU = torch.device("cpu")
SETTINGS = TrainSettings(epochs=2, patience=2, batch_size=5, lr=1e-3, weight_decay=0.01, warmup_steps=4, grad_clip=1.0)


def caption_set(captions: int = 15) -> CaptionSet:
    """Captions of 3 to 21 tokens over 6 images, right-padded as `CaptionSet.build` pads them."""
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(3, 22, (captions,), generator=generator)
    tokens = torch.randint(VOCAB, (captions, 2 * STATIC_WIDTH), generator=generator)
    tokens[torch.arange(tokens.shape[1]) >= lengths[:, None]] = 0
    return CaptionSet(torch.randn(6, EMBEDDING, generator=generator), torch.arange(captions) % 6, tokens, lengths)


def test_static_widths_are_multiples_of_the_step_with_the_same_real_tokens():
    data = caption_set()
    for (_, tokens, mask, _), (_, static_tokens, static_mask, _) in zip(data.batches(5), data.batches(5, None, STATIC_WIDTH)):
        assert static_mask.shape[1] % STATIC_WIDTH == 0 and static_mask.shape[1] >= mask.shape[1]
        assert torch.equal(static_mask[:, : mask.shape[1]], mask) and not static_mask[:, mask.shape[1]:].any()
        assert torch.equal(static_tokens[:, : tokens.shape[1]], tokens)


def test_the_loss_over_a_static_width_is_the_loss_over_the_longest_caption():
    captioner, data = tiny_captioner(), caption_set()
    for (features, tokens, mask, _), (_, wide, wide_mask, _) in zip(data.batches(5), data.batches(5, None, STATIC_WIDTH)):
        narrow = captioner.loss(features, tokens, mask)
        assert abs(captioner.loss(features, wide, wide_mask).item() / narrow.item() - 1) < 1e-5


def fit(captioner, compiled: bool, fused: bool = False) -> tuple[list[float], torch.Tensor]:
    """Two epochs of three steps, the warm-up across the first four; the epoch losses and the mapper's weights."""
    objective = CrossEntropy({"train": caption_set()}, SETTINGS.batch_size)
    if compiled:
        objective.compile(captioner, CPU)
    trainer = Optimisation.build(captioner, SETTINGS, SETTINGS.epochs * objective.steps, CPU)
    assert trainer.optimizer.defaults["fused"] is fused
    losses = [objective.epoch(captioner, trainer, torch.Generator().manual_seed(epoch), "test") for epoch in range(2)]
    return losses, torch.cat([p.detach().flatten() for p in captioner.mapper.parameters()])


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_eager_one(capsys):
    """Inductor's fused kernels round differently: the same run to float tolerance. Its first compile, on
    two cores with no cache, takes about a minute."""
    if shutil.which("g++") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("torch.compile needs g++ on the CPU: apt-get install g++ (.ci/run does)")
        pytest.skip("no g++: torch.compile cannot build its CPU kernels")
    eager_losses, eager = fit(tiny_captioner(), compiled=False)
    losses, weights = fit(tiny_captioner(), compiled=True)
    assert all(abs(a / b - 1) < 1e-4 for a, b in zip(losses, eager_losses)), (losses, eager_losses)
    # Adam moves every weight by about the learning rate whatever its gradient's size, so a rounding difference
    # in a near-zero gradient can flip a whole step: 8e-4 of the weights' norm after these six steps on one
    # AMD EPYC, under 1e-4 on another CPU. The second epoch's loss above shows the weights compute the same.
    assert float((weights - eager).norm() / eager.norm()) < 2e-3
    assert "test: first step, compiling it, took" in capsys.readouterr().err


def test_a_compiled_decoding_step_decodes_as_the_eager_one(monkeypatch):
    """The static cache's step under torch.compile (`static_steps`): traced whole (a graph break would raise), the
    eager path's captions in fp32, and batches of 5 and 7 images, both padded to 8, share one compiled step (a
    recompile would raise). What is asked here of the compiler is the trace: the cache updated and reordered in
    place, as one graph. Its kernels are left to the eager backend (AOT autograd, no Inductor): Inductor's CPU
    kernels are not a GPU's, the training step's test runs them, and they would cost a minute on two cores."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    captioner = tiny_captioner().eval()
    features = torch.randn(7, EMBEDDING, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("VICLIP_COMPILE", "off")
    eager = [beam_search(captioner, batch, 3, 20, 1.0) for batch in (features[:5], features)]
    monkeypatch.setenv("VICLIP_COMPILE", "on")
    assert beam_search(captioner, features[:5], 3, 20, 1.0) == eager[0]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    assert beam_search(captioner, features, 3, 20, 1.0) == eager[1]
    assert list(captioner.static) == [(8, 3, captioner.mapper.prefix_length + 20)]


def test_fused_adamw_follows_the_warm_up_as_the_foreach_one_does(monkeypatch):
    """Fused on a GPU (`Optimisation.build`); here forced on the CPU, whose fused kernel exists too."""
    losses, weights = fit(tiny_captioner(), compiled=False)
    adamw = torch.optim.AdamW
    monkeypatch.setattr(optimisation.torch.optim, "AdamW", lambda *args, **kwargs: adamw(*args, **{**kwargs, "fused": True}))
    fused_losses, fused = fit(tiny_captioner(), compiled=False, fused=True)
    assert all(abs(a / b - 1) < 1e-5 for a, b in zip(fused_losses, losses))
    assert float((fused - weights).norm() / weights.norm()) < 1e-5


@pytest.mark.parametrize("warmup, steps", [(0, 10), (4, 12), (50, 1140), (5, 2)])
def test_the_schedule_is_transformers_linear_warm_up_and_decay(warmup, steps):
    """`Optimisation.build`'s schedule, written out so that the baseline's training need not import transformers."""
    from transformers import get_linear_schedule_with_warmup

    settings = SETTINGS.model_copy(update={"warmup_steps": warmup})
    ours = Optimisation.build(tiny_captioner(), settings, steps, CPU)
    theirs = get_linear_schedule_with_warmup(torch.optim.AdamW(ours.optimizer.param_groups[0]["params"], lr=SETTINGS.lr),
                                             warmup, steps)
    for _ in range(steps + 2):
        assert ours.optimizer.param_groups[0]["lr"] == theirs.optimizer.param_groups[0]["lr"]
        for schedule in (ours.scheduler, theirs):
            schedule.optimizer.step()
            schedule.step()


@pytest.mark.parametrize("variable, chosen", [("VICLIP_COMPILE", devices.compiling),
                                              ("VICLIP_DEVICE_JPEGS", devices.jpegs_on_device)])
@pytest.mark.parametrize("value, cpu, gpu", [("auto", False, True), ("on", True, True), ("off", False, False)])
def test_the_step_compiles_and_jpegs_decode_on_a_gpu_unless_told(monkeypatch, variable, chosen, value, cpu, gpu):
    monkeypatch.setenv(variable, value)
    assert (chosen(CPU), chosen(torch.device("cuda"))) == (cpu, gpu)
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(ViclipError, match=rf"^{variable}='yes': expected one of auto, on, off$"):
        chosen(CPU)


def test_retrieval_and_lora_captioners_stay_eager():
    """In training and in decoding (`Captioner.start_decoding`)."""
    captioner = tiny_captioner()
    assert captioner.compiles
    captioner.lm.train = "lora"
    assert not captioner.compiles
