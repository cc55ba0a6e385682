"""The CNN+LSTM baseline: Show, Attend and Tell (Xu et al., 2015) over a frozen CNN's feature grid.

At each step an LSTM attends softly over the grid positions (additive
attention), gates the attended context (the paper's beta), and predicts the
next syllable from its state. Training adds the doubly stochastic penalty
lambda * sum_i (1 - sum_t alpha_ti)^2, which asks every position to be looked
at about once over the caption. Settings follow the paper's common
re-implementations: 512-wide embeddings, attention and LSTM state, dropout 0.5.

Words are syllables from the training captions only (the test split never
shapes the vocabulary), kept if seen at least `min_count` times; the rest are
`<unk>`. Syllables are the scoring protocol's tokens, so decoded captions need
no detokenisation. Its model directory holds `decoder.safetensors` (every
trained weight) and `vocab.json`.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import LstmConfig
from pipeline.core.errors import ViclipError
from pipeline.core.io import write_json
from pipeline.core.registry import Sections
from pipeline.data.annotations import ImageRecord
from pipeline.data.features import FeatureStore
from pipeline.evaluation.text import protocol_text
from pipeline.models.base import Architecture, CaptionModel, Step, load_weights, register, save_weights

WEIGHTS = "decoder.safetensors"
VOCAB = "vocab.json"
VOCAB_FORMAT = "viclip-vocab/1"
PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]  # SPECIALS, then syllables by falling frequency
    min_count: int

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int) -> Vocabulary:
        counts = collections.Counter(syllable for caption in captions for syllable in protocol_text(caption).split())
        kept = sorted((s for s, n in counts.items() if n >= min_count), key=lambda s: (-counts[s], s))
        return cls(SPECIALS + tuple(kept), min_count)

    @cached_property
    def index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, captions: list[str]) -> list[list[int]]:
        return [[self.index.get(s, UNK) for s in protocol_text(c).split()] + [END] for c in captions]

    def decode(self, tokens: list[int]) -> str:
        if END in tokens:
            tokens = tokens[: tokens.index(END)]
        return " ".join(self.tokens[t] for t in tokens if t >= len(SPECIALS))  # an <unk> matches no reference

    def save(self, path: Path) -> None:
        write_json(path, {"format": VOCAB_FORMAT, "min_count": self.min_count, "tokens": list(self.tokens)})

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != VOCAB_FORMAT or tuple(raw["tokens"][: len(SPECIALS)]) != SPECIALS:
                raise ValueError(f"format {raw.get('format')!r}")
            return cls(tuple(raw["tokens"]), raw["min_count"])
        except FileNotFoundError:
            raise ViclipError(f"{path}: vocabulary missing") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ViclipError(f"{path}: not a viclip vocabulary ({error})") from None


class SoftAttention(nn.Module):
    """Additive attention: alpha = softmax(w . tanh(W_f f_i + W_h h))."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.features = nn.Linear(feature_dim, attention_dim)
        self.hidden = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(
        self, features: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, P, C), keys = self.features(features) (B, P, A), hidden (B, H)
        -> context (B, C), alpha (B, P)."""
        alpha = self.score(torch.tanh(keys + self.hidden(hidden).unsqueeze(1))).squeeze(-1).softmax(-1)
        return (alpha.unsqueeze(-1) * features).sum(1), alpha


class ShowAttendTell(CaptionModel):
    def __init__(self, vocab: Vocabulary, feature_dim: int, config: LstmConfig):
        super().__init__()
        self.vocab = vocab
        self.attention_reg = config.attention_reg
        self.stop_id = END
        self.banned_ids = (PAD, START)
        self.max_tokens = None
        self.embedding = nn.Embedding(len(vocab), config.embed_dim)
        self.attention = SoftAttention(feature_dim, config.hidden_dim, config.attention_dim)
        self.init_h = nn.Linear(feature_dim, config.hidden_dim)
        self.init_c = nn.Linear(feature_dim, config.hidden_dim)
        self.gate = nn.Linear(config.hidden_dim, feature_dim)  # beta: how much context this step takes
        self.lstm = nn.LSTMCell(config.embed_dim + feature_dim, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_dim, len(vocab))

    def encode(self, captions: list[str]) -> list[list[int]]:
        return self.vocab.encode(captions)

    def decode(self, tokens: list[int]) -> str:
        return self.vocab.decode(tokens)

    def _begin(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, P, C) features -> keys (B, P, A) and the initial state h, c (B, H), from the mean feature."""
        mean = features.mean(1)
        return self.attention.features(features), self.init_h(mean), self.init_c(mean)

    def _step(
        self, tokens: torch.Tensor, features: torch.Tensor, keys: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed (B,) previous tokens -> logits (B, V), new h, c (B, H), attention alpha (B, P)."""
        context, alpha = self.attention(features, keys, h)
        context = torch.sigmoid(self.gate(h)) * context
        h, c = self.lstm(torch.cat([self.embedding(tokens), context], dim=-1), (h, c))
        return self.head(self.dropout(h)), h, c, alpha

    def loss(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: cross-entropy of each real token given the ones before it, plus the attention penalty."""
        features = features.float()  # (B, P, C); the store may hold float16
        keys, h, c = self._begin(features)
        inputs = torch.cat([torch.full_like(tokens[:, :1], START), tokens[:, :-1]], dim=1)  # (B, T)
        logits, alphas = [], []
        for t in range(tokens.shape[1]):
            step_logits, h, c, alpha = self._step(inputs[:, t], features, keys, h, c)
            logits.append(step_logits)
            alphas.append(alpha)
        logits = torch.stack(logits, 1)  # (B, T, V)
        attention = (torch.stack(alphas, 1) * mask.unsqueeze(-1)).sum(1)  # (B, P): each position's total
        cross_entropy = F.cross_entropy(logits[mask].float(), tokens[mask])
        return cross_entropy + self.attention_reg * ((1.0 - attention) ** 2).mean()

    def start_decoding(self, features: torch.Tensor, beams: int, length: int | None = None) -> tuple[torch.Tensor, Step]:
        features = features.float()
        keys, h, c = self._begin(features)
        logits, h, c, _ = self._step(torch.full((len(features),), START, device=features.device), features, keys, h, c)
        features, keys, h, c = (x.repeat_interleave(beams, dim=0) for x in (features, keys, h, c))

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            nonlocal h, c
            # A beam only ever continues a beam of its own image, so features and keys need no reordering.
            logits, h, c, _ = self._step(tokens, features, keys, h[rows], c[rows])
            return logits

        return logits, step

    def save(self, directory: Path) -> None:
        save_weights(self, directory / WEIGHTS)
        self.vocab.save(directory / VOCAB)

    def restore(self, directory: Path) -> None:
        load_weights(self, directory / WEIGHTS)


def build(sections: Sections, records: Sequence[ImageRecord], store: FeatureStore | None, attrs: dict[str, Any],
          device: torch.device) -> ShowAttendTell:
    """A fresh decoder whose vocabulary comes from `records`, the training split's captions."""
    vocab = Vocabulary.build((c for r in records for c in r.captions), sections["lstm"].min_count)
    return ShowAttendTell(vocab, attrs["embedding_dim"], sections["lstm"]).to(device)


def rebuild(model_dir: Path, sections: Sections, attrs: dict[str, Any], device: torch.device) -> ShowAttendTell:
    return ShowAttendTell(Vocabulary.load(model_dir / VOCAB), attrs["embedding_dim"], sections["lstm"]).to(device)


register("cnn_lstm", Architecture(("lstm",), build, rebuild))
