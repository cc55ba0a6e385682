"""Beam-search steps at a GPU's pace: the LM's keys and values in a preallocated (static) cache, reordered in
place, and the one-token step compiled (torch.compile; replayed as a CUDA graph on a GPU) once per batch shape.

Today's path (`Captioner.start_decoding` without a static cache) grows a cache by concatenation and rebuilds it
at every reorder: new tensors every step, which a captured graph cannot follow, and some 300 kernels a step issued
one by one from Python. Here every tensor the step touches keeps its address, so the step is captured once and
replayed. The batch is padded to a power of two of images (the padding decodes a copy of the first image, and is
dropped): a service's varied batch sizes meet a few shapes, each compiled once.

A family whose transformers class cannot compile whole (`_can_compile_fullgraph`: MPT) keeps today's path, as do
retrieval's left-padded prompts (their attention mask grows by a column a step).
"""

from __future__ import annotations

import torch
from transformers import StaticCache

from pipeline.models.base import Step
from pipeline.models.viclipcap.lm import LanguageModel


def supported(lm: LanguageModel) -> bool:
    """Whether the LM's family runs on a static cache under torch.compile."""
    return bool(getattr(lm.model, "_can_compile_fullgraph", False))


def padded_images(images: int) -> int:
    """The images a batch is padded to: the next power of two."""
    return 1 << (images - 1).bit_length()


class StaticSteps:
    """The static cache and the (compiled) step for batches of `images` images, `beams` rows each, whose
    context and caption together take at most `positions` positions."""

    def __init__(self, lm: LanguageModel, keyword: str, images: int, beams: int, positions: int):
        self.lm, self.keyword, self.images, self.beams = lm, keyword, images, beams
        self.cache = StaticCache(config=lm.model.config, max_cache_len=positions)
        self.run, self.graphs = self._step, False

    def compile(self) -> StaticSteps:
        """The step compiled, and on a GPU captured as a CUDA graph: never recompiled for a new batch, since every
        input keeps its shape and the cache its addresses."""
        self.graphs = self.lm.model.device.type == "cuda"
        self.run = torch.compile(self._step, dynamic=False, mode="reduce-overhead" if self.graphs else None)
        return self

    def start(self, context: torch.Tensor) -> tuple[torch.Tensor, Step]:
        """(N, P, W) context embeddings, N ≤ images -> (N, V) first-token logits, and the step over N * beams
        rows. The context runs once per beam row, eagerly (transformers compiles no prefill): the cache's rows
        are then every beam's own, as the step reorders them."""
        count = len(context)
        if count < self.images:
            context = torch.cat([context, context[:1].expand(self.images - count, -1, -1)])
        self.cache.reset()
        with self.lm.compute():
            out = self.lm.model(inputs_embeds=context.repeat_interleave(self.beams, dim=0), use_cache=True,
                                logits_to_keep=1, **{self.keyword: self.cache})
        first = out.logits[:: self.beams, -1][:count]
        live = count * self.beams
        # The padding rows continue themselves with any token: their logits are never read.
        spare = torch.arange(live, self.images * self.beams, device=context.device)
        filler = torch.zeros_like(spare)

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits have been read
            return self.run(torch.cat([rows, spare]), torch.cat([tokens, filler]))[:live]

        return first, step

    def _step(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Reorder the cache to follow the surviving beams, in place, then feed each row's next token."""
        for layer in self.cache.layers:
            layer.keys.copy_(layer.keys.index_select(0, rows))
            layer.values.copy_(layer.values.index_select(0, rows))
        with self.lm.compute():
            out = self.lm.model(input_ids=tokens.view(-1, 1), use_cache=True, **{self.keyword: self.cache})
        return out.logits[:, -1]
