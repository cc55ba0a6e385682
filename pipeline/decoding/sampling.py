"""Sampling captions from a model's distribution, many images at once, on its decoding state.

Beam search (`beam`) finds each image's likeliest caption; self-critical training draws several
captions an image instead and rewards each, so it needs samples, drawn as a user's model would write
them: the same decoding state (the LM's KV cache), the same banned tokens, the same stop.
"""

from __future__ import annotations

import torch

from pipeline.models.base import CaptionModel


@torch.inference_mode()
def sample(model: CaptionModel, features: torch.Tensor, samples: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` captions per image, drawn token by token from the model's distribution on its decoding state
    (the KV cache): (N * samples, T) token ids, image by image, and their (N * samples,) lengths, the stop
    included where a caption reached it. Banned tokens are never drawn; after the stop a row only pads."""
    first, step = model.start_decoding(features, samples)
    never = torch.zeros(first.shape[-1], device=features.device)
    never[list(model.banned_ids)] = float("-inf")
    rows = torch.arange(len(features) * samples, device=features.device)
    logits = first.repeat_interleave(samples, dim=0)
    tokens, finished = [], torch.zeros(len(rows), dtype=torch.bool, device=features.device)
    lengths = torch.zeros(len(rows), dtype=torch.long, device=features.device)
    for position in range(max_length):
        drawn = torch.multinomial((logits.float() + never).softmax(-1), 1).squeeze(1)  # (N * S,)
        drawn = drawn.masked_fill(finished, model.stop_id)
        lengths += ~finished
        finished |= drawn == model.stop_id
        tokens.append(drawn)
        if finished.all() or position == max_length - 1:
            break
        logits = step(rows, drawn)
    return torch.stack(tokens, dim=1), lengths
