"""Beam search over many images at once, for either model.

The model keeps its own decoding state (the LM's key/value cache, or the
LSTM's h and c) and reorders it to follow the surviving beams, so each step
feeds one new token per beam and no step re-runs the sequence so far. Beams
are ranked by sum of log-probabilities / length ** length_penalty (the stop
token counts in the length); a finished beam carries forward unchanged. The
model's banned tokens are never chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm import tqdm

from pipeline.core import distributed
from pipeline.core.config import ScoreConfig
from pipeline.core.errors import ViclipError
from pipeline.models.base import CaptionModel


class Decoded(NamedTuple):
    tokens: list[list[int]]  # each image's best caption, stop excluded
    finished: list[bool]  # whether it ended with the stop, rather than at max_length


@torch.inference_mode()
def beam_search(
    model: CaptionModel,
    features: torch.Tensor,
    beam_size: int,
    max_length: int,
    length_penalty: float,
) -> Decoded:
    """(N, ...) image features -> the best caption's token ids for each image, and whether it stopped."""
    stop = model.stop_id
    images, beams = features.shape[0], beam_size
    device = features.device

    first, step = model.start_decoding(features, beams, max_length)
    vocab = first.shape[-1]
    # Tokens that can never be a caption's (special tokens, rows no tokenizer entry maps to) are never chosen.
    never = torch.zeros(vocab, device=device)
    never[list(model.banned_ids)] = float("-inf")
    logp = first.float().log_softmax(-1) + never  # (N, V)
    logp = logp.repeat_interleave(beams, dim=0).view(images, beams, vocab)

    # At the start only beam 0 is live, so the first step picks distinct tokens.
    scores = torch.full((images, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    lengths = torch.zeros(images, beams, device=device)
    finished = torch.zeros(images, beams, dtype=torch.bool, device=device)
    tokens = torch.empty(images, beams, 0, dtype=torch.long, device=device)
    stop_only = torch.full((vocab,), float("-inf"), device=device)
    stop_only[stop] = 0.0
    offsets = torch.arange(images, device=device).unsqueeze(1) * beams  # (N, 1)

    for _ in range(max_length):
        logp = torch.where(finished.unsqueeze(-1), stop_only, logp)
        new_lengths = lengths + (~finished).float()  # (N, W)
        candidates = scores.unsqueeze(-1) + logp  # (N, W, V)
        ranking = candidates / new_lengths.unsqueeze(-1) ** length_penalty
        chosen = ranking.view(images, -1).topk(beams, dim=-1).indices  # (N, W)
        source, token = chosen // vocab, chosen % vocab

        scores = candidates.view(images, -1).gather(1, chosen)
        lengths = new_lengths.gather(1, source)
        finished = finished.gather(1, source) | (token == stop)
        tokens = torch.cat([tokens.gather(1, source.unsqueeze(-1).expand_as(tokens)), token.unsqueeze(-1)], -1)
        if finished.all():
            break
        logp = (step((source + offsets).view(-1), token.view(-1)).float().log_softmax(-1) + never).view(images, beams, vocab)

    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(dim=1)  # (N,)
    chosen = [tokens[i, best[i]].tolist() for i in range(images)]
    return Decoded([_until(t, stop) for t in chosen], [stop in t for t in chosen])


def _until(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens


@dataclass
class Captions:
    texts: list[str]
    unfinished: int  # captions that reached max_length without stopping
    max_length: int  # the limit decoding used: score.max_length, capped by what the model can hold
    clamped_from: int | None  # score.max_length, where the model could not hold it


def token_limit(model: CaptionModel, max_length: int) -> int:
    """`max_length`, capped so the LM's context holds the prefix, the prompt and the caption: a decoder never
    asks for positions the LM does not have."""
    limit = max_length if model.max_tokens is None else min(max_length, model.max_tokens)
    if limit < 1:
        raise ViclipError(f"the LM's context holds no caption token after the prefix and prompt ({model.max_tokens} positions left)")
    return limit


def caption_features(
    model: CaptionModel, features: torch.Tensor | Iterable[torch.Tensor], settings: ScoreConfig,
    description: str | None = "decode", total: int | None = None,
) -> Captions:
    """Captions for (N, ...) image features, decoded `settings.batch_size` images at a time, or for an iterable
    of such batches (`total` of them: a store streamed from disk). A progress bar named `description` on a
    terminal (None: none, as a service decoding many small batches wants)."""
    limit = token_limit(model, settings.max_length)
    batches = features.split(settings.batch_size) if isinstance(features, torch.Tensor) else features
    texts: list[str] = []
    unfinished = 0
    for batch in tqdm(batches, desc=description, unit="batch", total=total,
                      disable=distributed.progress_disabled() if description else True):
        decoded = beam_search(model, batch, settings.beam_size, limit, settings.length_penalty)
        texts += [model.decode(tokens) for tokens in decoded.tokens]
        unfinished += decoded.finished.count(False)
    return Captions(texts, unfinished, limit, settings.max_length if limit < settings.max_length else None)
