"""Beam search over many images at once, for either model.

The model keeps its own decoding state (the LM's key/value cache, or the
LSTM's h and c) and reorders it to follow the surviving beams, so each step
feeds one new token per beam and no step re-runs the sequence so far. Beams
are ranked by sum of log-probabilities / length ** length_penalty (the
end-of-text token counts in the length); a finished beam carries forward
unchanged.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.config import ScoreConfig
from pipeline.models.base import CaptionModel


@torch.inference_mode()
def beam_search(
    model: CaptionModel,
    features: torch.Tensor,
    beam_size: int,
    max_length: int,
    length_penalty: float,
) -> list[list[int]]:
    """(N, ...) image features -> the best caption's token ids for each image, end-of-text excluded."""
    eos = model.eos_token_id
    images, beams = features.shape[0], beam_size
    device = features.device

    first, step = model.start_decoding(features, beams)
    logp = first.float().log_softmax(-1)  # (N, V)
    vocab = logp.shape[-1]
    logp = logp.repeat_interleave(beams, dim=0).view(images, beams, vocab)

    # At the start only beam 0 is live, so the first step picks distinct tokens.
    scores = torch.full((images, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    lengths = torch.zeros(images, beams, device=device)
    finished = torch.zeros(images, beams, dtype=torch.bool, device=device)
    tokens = torch.empty(images, beams, 0, dtype=torch.long, device=device)
    eos_only = torch.full((vocab,), float("-inf"), device=device)
    eos_only[eos] = 0.0
    offsets = torch.arange(images, device=device).unsqueeze(1) * beams  # (N, 1)

    for _ in range(max_length):
        logp = torch.where(finished.unsqueeze(-1), eos_only, logp)
        new_lengths = lengths + (~finished).float()  # (N, W)
        candidates = scores.unsqueeze(-1) + logp  # (N, W, V)
        ranking = candidates / new_lengths.unsqueeze(-1) ** length_penalty
        chosen = ranking.view(images, -1).topk(beams, dim=-1).indices  # (N, W)
        source, token = chosen // vocab, chosen % vocab

        scores = candidates.view(images, -1).gather(1, chosen)
        lengths = new_lengths.gather(1, source)
        finished = finished.gather(1, source) | (token == eos)
        tokens = torch.cat([tokens.gather(1, source.unsqueeze(-1).expand_as(tokens)), token.unsqueeze(-1)], -1)
        if finished.all():
            break
        logp = step((source + offsets).view(-1), token.view(-1)).float().log_softmax(-1).view(images, beams, vocab)

    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(dim=1)  # (N,)
    return [_until_eos(tokens[i, best[i]].tolist(), eos) for i in range(images)]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def caption_features(
    model: CaptionModel, features: torch.Tensor, settings: ScoreConfig, description: str = "decode"
) -> list[str]:
    """Captions for (N, ...) image features, decoded `settings.batch_size` images at a time."""
    captions: list[str] = []
    for batch in tqdm(features.split(settings.batch_size), desc=description, unit="batch", disable=None):
        for tokens in beam_search(model, batch, settings.beam_size, settings.max_length, settings.length_penalty):
            captions.append(model.decode(tokens))
    return captions
