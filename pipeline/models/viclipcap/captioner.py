"""ViCLIPCap: a trained mapping network in front of an LM, frozen by default (prefix tuning, after ClipCap).

Its model directory holds `mapper.safetensors`, the mapper's weights, and of the LM what was trained
(lm.train): nothing when frozen, `lm_lora.safetensors` (the adapters) or `lm.safetensors` (every weight).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import LmConfig, MapperConfig
from pipeline.core.devices import compiling
from pipeline.core.errors import ViclipError
from pipeline.core.registry import Sections
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore
from pipeline.models.base import Architecture, CaptionModel, Step, load_weights, register, save_weights
from pipeline.models.viclipcap import static_steps
from pipeline.models.viclipcap.lm import LanguageModel, load_lm
from pipeline.models.viclipcap.loss import frozen_head_cross_entropy
from pipeline.models.viclipcap.mapper import build_mapper
from pipeline.models.viclipcap.retrieval import Datastore, Retrieval

WEIGHTS = "mapper.safetensors"

def cache_keyword(lm: nn.Module) -> str:
    """The KV cache's name, in and out: `past_key_values` in the transformers of stock GPU images (5.17),
    `cache` in later ones. A wrong keyword is swallowed by **kwargs: decoding would silently lose its context."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class Captioner(CaptionModel):
    def __init__(self, mapper: nn.Module, lm: LanguageModel, retrieval: Retrieval | None = None):
        super().__init__()
        self.mapper = mapper
        # A plain dataclass, not a submodule: a frozen LM is not ours to train or save,
        # so parameters() and state_dict() see the mapper alone, and train() leaves it in eval mode.
        self.lm = lm
        if lm.train != "frozen":
            # A trained one is a submodule: parameters() (what the optimiser gets, its frozen base weights
            # with requires_grad off), train()/eval() (its dropout), state_dict() (the resume checkpoint)
            # and DistributedDataParallel see it.
            self.trained_lm = lm.model
        self.retrieval = retrieval  # viclipcap_rag: a prompt of retrieved captions after the prefix
        self.stop_id = lm.stop_id
        self.banned_ids = lm.banned_ids
        self.max_prompt = 0 if retrieval is None else self._longest_prompt(retrieval)
        leading = lm.bos_id is not None  # the beginning-of-sequence token before the prefix
        self.max_tokens = lm.max_positions - leading - mapper.prefix_length - self.max_prompt
        self.static: dict[tuple, static_steps.StaticSteps] = {}  # a compiled decoding step's, by batch shape

    @property
    def compiles(self) -> bool:
        """Whether the training forward and the decoding step compile: retrieval builds its prompts on the host,
        and peft's adapters are untried under torch.compile."""
        return self.retrieval is None and self.lm.train != "lora"

    def record(self) -> dict[str, Any]:
        record = {"lm": self.lm.fingerprint()}
        if self.retrieval is not None:
            record["datastore"] = self.retrieval.datastore.source
        return record

    def encode(self, captions: list[str]) -> list[list[int]]:
        # After a prompt the caption continues running text: its first syllable takes its space.
        return self.lm.encode([" " + c for c in captions] if self.retrieval else captions)

    def decode(self, tokens: list[int]) -> str:
        return self.lm.decode(tokens)

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) image embeddings -> (B, k, W) prefix embeddings; after the tokenizer's beginning-of-sequence
        token where it puts one before every text (Llama's <s>): the LM never read anything without it."""
        prefix = self.mapper(embeddings)
        if self.lm.bos_id is None:
            return prefix
        bos = self.lm.model.get_input_embeddings().weight[self.lm.bos_id]  # (W,): no host-to-device copy a step
        return torch.cat([bos.to(prefix.dtype).expand(len(prefix), 1, -1), prefix], dim=1)

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        return self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _longest_prompt(self, retrieval: Retrieval) -> int:
        """Tokens in the longest prompt the datastore can make: what the LM's context keeps free for it."""
        lengths = [len(t) for t in self._prompt_ids([" " + c for c in retrieval.datastore.captions])]
        return len(self._prompt_ids([retrieval.longest(lengths)])[0])

    def context(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the LM reads before the caption: (B, P, W) embeddings, and where some rows are shorter, a (B, P)
        mask of real positions (None: all real). Without retrieval that is the prefix; with it, the prefix then
        the image's prompt, left-padded so that every row's caption starts at position P."""
        prefix = self.prefix(embeddings)  # (B, k, W), or (B, 1 + k, W) after a beginning-of-sequence token
        if self.retrieval is None:
            return prefix, None
        prompts = self._prompt_ids(self.retrieval.texts(embeddings))
        longest = max(len(p) for p in prompts)
        if longest > self.max_prompt:
            raise ViclipError(f"a retrieval prompt of {longest} tokens is longer than the {self.max_prompt} allowed for")
        batch, k = prefix.shape[:2]
        ids = torch.zeros(batch, longest, dtype=torch.long, device=prefix.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=prefix.device)
        right = torch.cat([prefix, self.lm.model.get_input_embeddings()(ids)], dim=1)  # (B, P, W), padding last
        width = right.shape[1]
        pad = torch.tensor([longest - len(p) for p in prompts], device=prefix.device)  # (B,)
        columns = torch.arange(width, device=prefix.device)
        source = (columns - pad[:, None]) % width  # (B, P): left padding, each row rolled right by its padding
        mask = columns >= pad[:, None]
        return right.gather(1, source[..., None].expand(-1, -1, right.shape[2])), mask

    def loss(self, embeddings: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the caption tokens given the prefix (and prompt); with `weights` (B,), each
        caption's tokens weighted by its caption's weight (self-critical training's advantages).

        tokens, mask: (B, T), right-padded; mask is True on real tokens. Every position of the padded width is
        computed and weighted by the mask: no gather of the real ones, whose count the host would wait for, and
        the same shapes for every batch of a width. A frozen head (the default) goes through
        `frozen_head_cross_entropy`, which takes the logits to be the head applied to the last hidden state, as
        GPT-2's are; a trainable one through full logits.
        """
        context, real = self.context(embeddings)  # (B, P, W), (B, P) or None
        loss = self._loss(context, real, tokens, mask, weights)
        return loss if self.lm.settled(loss) else self._loss(context, real, tokens, mask, weights)

    def _loss(self, context: torch.Tensor, real: torch.Tensor | None, tokens: torch.Tensor, mask: torch.Tensor,
              weights: torch.Tensor | None) -> torch.Tensor:
        share = mask / mask.sum()  # (B, T): each position's share of the mean, 0 on padding
        if weights is not None:
            share = share * weights[:, None]
        with self.lm.compute():
            words = self.lm.model.get_input_embeddings()(tokens)  # (B, T, W)
            inputs = self.lm.inputs(torch.cat([context, words], dim=1))
            # Right padding under the causal mask: no caption position sees a pad, so no attention mask (nor
            # transformers' checks of one, which wait for the device). Left-padded prompts keep theirs.
            where = {}
            if real is not None:
                attention = torch.cat([real, mask], dim=1).long()
                where = {"attention_mask": attention, "position_ids": _positions(attention)}
            head = self.lm.model.get_output_embeddings()
            # Only positions P-1 .. P+T-2 predict caption tokens: skip the LM head elsewhere.
            if self.lm.plain_head and not any(p.requires_grad for p in head.parameters()):
                hidden = self.lm.model.base_model(inputs_embeds=inputs, **where).last_hidden_state
                return frozen_head_cross_entropy(hidden[:, context.shape[1] - 1 : -1].flatten(0, 1), head,
                                                 tokens.flatten(), weights=share.flatten())
            logits = self.lm.model(inputs_embeds=inputs, logits_to_keep=tokens.shape[1] + 1, **where).logits[:, :-1]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")  # (B * T,)
            return (losses * share.flatten()).sum()

    def start_decoding(self, embeddings: torch.Tensor, beams: int, length: int | None = None) -> tuple[torch.Tensor, Step]:
        """Run the prefix once; each later step feeds one token per beam on the reordered KV cache. Where the step
        compiles (`devices.compiling`) and `length` bounds the steps, the cache is static (`static_steps`)."""
        first, step = self._start_decoding(embeddings, beams, length)
        if self.lm.settled(first):
            return first, step
        self.static.clear()  # caches of the fp16 weights, which are fp32 again
        return self._start_decoding(embeddings, beams, length)

    def _start_decoding(self, embeddings: torch.Tensor, beams: int, length: int | None) -> tuple[torch.Tensor, Step]:
        lm = self.lm.model
        keyword = cache_keyword(lm)
        context, real = self.context(embeddings)
        context = self.lm.inputs(context)
        if length is not None and self.compiles and static_steps.supported(self.lm) and compiling(embeddings.device):
            # One cache and compiled step per shape; an fp16 overflow's fall-back clears them (`start_decoding`).
            shape = (static_steps.padded_images(len(context)), beams, context.shape[1] + length)
            if shape not in self.static:
                self.static[shape] = static_steps.StaticSteps(self.lm, keyword, *shape).compile()
            return self.static[shape].start(context)
        # The last position's logits alone: the others would be (B, P, V), 2.4 GB for BLOOM's vocabulary at
        # batch 64 and prefix 40.
        with self.lm.compute():
            if real is None:
                out = lm(inputs_embeds=context, use_cache=True, logits_to_keep=1)
            else:
                out = lm(inputs_embeds=context, attention_mask=real.long(), position_ids=_positions(real),
                         use_cache=True, logits_to_keep=1)
                attention = real.long().repeat_interleave(beams, dim=0)  # (N * beams, P), then one column a step
        cache = out[keyword]
        cache.batch_repeat_interleave(beams)

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            nonlocal attention
            cache.reorder_cache(rows)
            where = {}
            if real is not None:
                attention = torch.cat([attention[rows], attention.new_ones(len(rows), 1)], dim=1)
                where = {"attention_mask": attention, "position_ids": attention.sum(1, keepdim=True) - 1}
            with self.lm.compute():
                return lm(input_ids=tokens.view(-1, 1), use_cache=True, **{keyword: cache}, **where).logits[:, -1]

        return out.logits[:, -1], step

    def save(self, directory: Path) -> None:
        save_weights(self.mapper, directory / WEIGHTS)
        self.lm.save(directory)
        if self.retrieval is not None:
            self.retrieval.datastore.save(directory)

    def restore(self, directory: Path) -> None:
        load_weights(self.mapper, directory / WEIGHTS)
        self.lm.restore(directory)


def _positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: real tokens count from 0, as they would without the padding."""
    return (attention.long().cumsum(1) - 1).clamp(min=0)


def build(sections: Sections, records: Sequence[ImageRecord], store: FeatureStore | None, attrs: dict[str, Any],
          device: torch.device) -> Captioner:
    """A fresh mapper sized from the stored embeddings and the LM, in front of the LM as lm.train sets it up; with
    a `retrieval` section, the training split's store and captions as the datastore."""
    retrieval = None
    if sections.get("retrieval") is not None:
        retrieval = Retrieval(Datastore.build(store, records, device), sections["retrieval"])
    captioner = _assemble(sections["lm"], sections["mapper"], retrieval, attrs, device)
    captioner.lm.check_stop([c for record in records for c in record.captions])
    return captioner


def rebuild(model_dir: Path, sections: Sections, attrs: dict[str, Any], device: torch.device) -> Captioner:
    retrieval = sections.get("retrieval")
    retrieval = None if retrieval is None else Retrieval(Datastore.load(model_dir, attrs["embedding_dim"], device), retrieval)
    return _assemble(sections["lm"], sections["mapper"], retrieval, attrs, device)


def _assemble(lm_settings: LmConfig, mapper: MapperConfig, retrieval: Retrieval | None, attrs: dict[str, Any],
              device: torch.device) -> Captioner:
    lm = load_lm(lm_settings.name, lm_settings.stop, device, lm_settings.train, lm_settings.lora,
                 lm_settings.max_positions)
    return Captioner(build_mapper(mapper, attrs["embedding_dim"], lm.width).to(device), lm, retrieval)


register("viclipcap", Architecture(("lm", "mapper"), build, rebuild))
