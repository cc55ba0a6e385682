"""The field's reference implementation (ClipCap), written plainly, to measure viclip against.

Each function does the work the reference does, in the way it does it (docs/conventions.md,
"The reference implementation's input pipeline"): one image per CLIP call, once per caption;
every caption padded to one fixed length, fp32, logits over every position and gradients
through the "frozen" LM's weights; beam search on one image at a time, re-running the whole
sequence at every step without a key/value cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.encoders.clip import ClipEncoder
from pipeline.models.viclipcap import Captioner


@torch.no_grad()
def extract(encoder: ClipEncoder, files: Sequence[Path], captions_per_image: int, device: torch.device) -> torch.Tensor:
    """One embedding per caption: each image is opened and encoded alone, once for each of its captions."""
    # The whole transform on the host, as the reference has it: float32 pixels go to the device.
    to_float = copy.deepcopy(encoder.standardise).cpu()
    rows = []
    for path in files:
        for _ in range(captions_per_image):
            pixels = to_float(encoder.preprocess(Image.open(path).convert("RGB")).unsqueeze(0)).to(device)
            rows.append(encoder.model.encode_image(pixels).cpu())
    return torch.cat(rows)


def train_step(
    captioner: Captioner, embeddings: torch.Tensor, tokens: torch.Tensor, optimizer: torch.optim.Optimizer
) -> float:
    """One step on (B, L) tokens padded with 0 to the dataset's fixed length; the LM's weights get
    gradients (the caller sets requires_grad), fp32, logits for every position."""
    lm = captioner.lm.model
    prefix = captioner.prefix(embeddings)  # (B, k, W)
    mask = torch.cat([torch.ones(prefix.shape[:2], device=tokens.device), (tokens > 0).float()], dim=1)
    inputs = torch.cat([prefix, lm.get_input_embeddings()(tokens)], dim=1)
    logits = lm(inputs_embeds=inputs, attention_mask=mask).logits[:, prefix.shape[1] - 1 : -1]  # (B, L, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def beam_search(captioner: Captioner, embedding: torch.Tensor, beam_size: int, max_length: int) -> list[int]:
    """One image; every step runs the LM over the whole sequence so far, for every beam."""
    lm, stop = captioner.lm.model, captioner.stop_id
    embed = lm.get_input_embeddings()
    sequence = captioner.prefix(embedding.unsqueeze(0))  # (1, k, W), then (beams, k + t, W)
    scores = torch.zeros(1, device=embedding.device)
    lengths = torch.zeros(1, device=embedding.device)
    stopped = torch.zeros(1, dtype=torch.bool, device=embedding.device)
    tokens = torch.empty(1, 0, dtype=torch.long, device=embedding.device)
    for _ in range(max_length):
        logp = lm(inputs_embeds=sequence).logits[:, -1].softmax(-1).log()  # (beams, V)
        logp[:, list(captioner.banned_ids)] = float("-inf")  # as viclip: tokens no caption can hold
        logp[stopped] = float("-inf")
        logp[stopped, stop] = 0.0
        total = scores.unsqueeze(1) + logp
        grown = lengths + (~stopped).float()
        best, chosen = (total / grown.unsqueeze(1)).view(-1).topk(beam_size)
        source, token = chosen // logp.shape[1], chosen % logp.shape[1]
        scores, lengths = total.view(-1)[chosen], grown[source]
        stopped = stopped[source] | (token == stop)
        tokens = torch.cat([tokens[source], token.unsqueeze(1)], dim=1)
        sequence = torch.cat([sequence[source], embed(token).unsqueeze(1)], dim=1)
        if stopped.all():
            break
    return tokens[(scores / lengths).argmax()].tolist()
