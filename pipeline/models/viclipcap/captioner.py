"""ViCLIPCap: a trained mapping network in front of a frozen LM (prefix tuning, after ClipCap).

Its model directory holds `mapper.safetensors`, the mapper's weights, and nothing of the LM.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from pipeline.config import Config
from pipeline.data import ImageRecord
from pipeline.models.base import CaptionModel, Family, Step, load_weights, register, save_weights
from pipeline.models.viclipcap.lm import LanguageModel, load_lm
from pipeline.models.viclipcap.loss import frozen_head_cross_entropy
from pipeline.models.viclipcap.mapper import build_mapper

WEIGHTS = "mapper.safetensors"

IGNORE = -100  # label of prefix and padding positions: never id 0, which is a real GPT-2 token


def cache_keyword(lm: nn.Module) -> str:
    """The KV cache's name, in and out: `past_key_values` in the transformers of stock GPU images (5.17),
    `cache` in later ones. A wrong keyword is swallowed by **kwargs: decoding would silently lose its context."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class Captioner(CaptionModel):
    def __init__(self, mapper: nn.Module, lm: LanguageModel):
        super().__init__()
        self.mapper = mapper
        # A plain dataclass, not a submodule: the LM is not ours to train or save,
        # so parameters() and state_dict() see the mapper alone.
        self.lm = lm
        self.stop_id = lm.stop_id
        self.banned_ids = lm.banned_ids
        self.max_tokens = lm.model.config.max_position_embeddings - mapper.prefix_length

    def record(self) -> dict[str, Any]:
        return {"lm_fingerprint": self.lm.fingerprint()}

    def encode(self, captions: list[str]) -> list[list[int]]:
        return self.lm.encode(captions)

    def decode(self, tokens: list[int]) -> str:
        return self.lm.decode(tokens)

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) image embeddings -> (B, k, W) prefix embeddings."""
        return self.mapper(embeddings)

    def loss(self, embeddings: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the caption tokens given the prefix.

        tokens, mask: (B, T), right-padded; mask is True on real tokens. A frozen head (the default) goes
        through `frozen_head_cross_entropy`, on real tokens only; a trainable one through full logits.
        The first takes the logits to be the head applied to the last hidden state, as GPT-2's are.
        """
        prefix = self.prefix(embeddings)  # (B, k, W)
        words = self.lm.model.get_input_embeddings()(tokens)  # (B, T, W)
        inputs = torch.cat([prefix, words], dim=1)
        attention = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1).long()
        head = self.lm.model.get_output_embeddings()
        # Only positions k-1 .. k+T-2 predict caption tokens: skip the LM head elsewhere.
        if not any(p.requires_grad for p in head.parameters()):
            hidden = self.lm.model.base_model(inputs_embeds=inputs, attention_mask=attention).last_hidden_state
            return frozen_head_cross_entropy(hidden[:, prefix.shape[1] - 1 : -1][mask], head, tokens[mask])
        logits = self.lm.model(
            inputs_embeds=inputs, attention_mask=attention, logits_to_keep=tokens.shape[1] + 1,
        ).logits[:, :-1]  # (B, T, V)
        labels = tokens.masked_fill(~mask, IGNORE)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    def start_decoding(self, embeddings: torch.Tensor, beams: int) -> tuple[torch.Tensor, Step]:
        """Run the prefix once; each later step feeds one token per beam on the reordered KV cache."""
        lm = self.lm.model
        keyword = cache_keyword(lm)
        out = lm(inputs_embeds=self.prefix(embeddings), use_cache=True)
        cache = out[keyword]
        cache.batch_repeat_interleave(beams)

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            cache.reorder_cache(rows)
            return lm(input_ids=tokens.view(-1, 1), use_cache=True, **{keyword: cache}).logits[:, -1]

        return out.logits[:, -1], step

    def save(self, directory: Path) -> None:
        save_weights(self.mapper, directory / WEIGHTS)

    def restore(self, directory: Path) -> None:
        load_weights(self.mapper, directory / WEIGHTS)


def build(config: Config, records: Sequence[ImageRecord], encoder: dict[str, Any], device: torch.device) -> Captioner:
    """A fresh mapper sized from the stored embeddings and the LM, in front of the frozen LM."""
    lm = load_lm(config.lm.name, config.lm.stop, device)
    return Captioner(build_mapper(config.mapper, encoder["embedding_dim"], lm.width).to(device), lm)


def rebuild(model_dir: Path, sections: dict[str, BaseModel], encoder: dict[str, Any], device: torch.device) -> Captioner:
    lm = load_lm(sections["lm"].name, sections["lm"].stop, device)
    return Captioner(build_mapper(sections["mapper"], encoder["embedding_dim"], lm.width).to(device), lm)


register("viclipcap", Family("clip", ("clip", "lm", "mapper"), build, rebuild))
