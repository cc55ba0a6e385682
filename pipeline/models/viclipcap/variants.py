"""ViCLIPCap's variants, each a model of its own: its own model directory, metrics file and DVC stages.

  viclipcap_rag        a prompt of retrieved training captions after the prefix (`retrieval`), trained by
                       cross-entropy like viclipcap (`train.viclipcap_rag`)
  viclipcap_scst       a trained model's mapper (`train.viclipcap_scst.start_from`) fine-tuned by
                       self-critical sequence training on CIDEr-D (pipeline.training.scst)
  viclipcap_published  the published ViCLIPCap run: its CLIP (`clip_published`), its MLP mapper with
                       prefix 10 and the LM trained with it (`viclipcap_published`)

Each is the viclipcap captioner with other settings: a variant's `view` puts them where the captioner
reads them, so building, recording and reloading stay one code path.
"""

from __future__ import annotations

from pipeline.core.config import Config
from pipeline.models.base import REGISTRY, register
from pipeline.models.viclipcap.captioner import captioner_family


def _published(config: Config) -> Config:
    published = config.viclipcap_published
    return config.model_copy(update={
        "clip": config.clip_published, "mapper": published.mapper, "retrieval": None,
        "lm": config.lm.model_copy(update={"train": published.lm_train}),
    })


def _scst(config: Config) -> Config:
    """The settings of the model it starts from: SCST changes the weights, not the model."""
    return REGISTRY[config.train.viclipcap_scst.start_from].view(config)


register("viclipcap_rag", captioner_family(reads=("clip", "lm", "mapper", "retrieval")))
# What its starting model reads changes that model's directory, on which it depends.
register("viclipcap_scst", captioner_family(view=_scst, objective="scst"))
register("viclipcap_published", captioner_family("clip_published", view=_published,
                                                 reads=("clip_published", "lm", "viclipcap_published")))
