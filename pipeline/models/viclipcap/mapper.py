"""Mapping networks: one CLIP embedding -> `prefix_length` embeddings in the LM's input space.

Shapes follow ClipCap (arXiv 2111.09734): the MLP used with a fine-tuned LM,
the Transformer with a frozen one.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.config import MapperConfig


class MLPMapper(nn.Module):
    def __init__(self, embedding_dim: int, lm_width: int, prefix_length: int):
        super().__init__()
        self.prefix_length = prefix_length
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, lm_width * prefix_length // 2),
            nn.Tanh(),
            nn.Linear(lm_width * prefix_length // 2, lm_width * prefix_length),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        batch = embeddings.shape[0]
        return self.net(embeddings).view(batch, self.prefix_length, -1)  # (B, k, W)


class TransformerMapper(nn.Module):
    """Project to `clip_length` tokens, append `prefix_length` learned constants,
    run pre-norm self-attention; the outputs at the constants are the prefix."""

    def __init__(
        self, embedding_dim: int, lm_width: int, prefix_length: int, clip_length: int,
        num_layers: int, num_heads: int,
    ):
        super().__init__()
        self.prefix_length = prefix_length
        self.clip_length = clip_length
        self.project = nn.Linear(embedding_dim, clip_length * lm_width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_width))
        layer = nn.TransformerEncoderLayer(
            lm_width, num_heads, dim_feedforward=2 * lm_width, dropout=0.0,
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        batch = embeddings.shape[0]
        tokens = self.project(embeddings).view(batch, self.clip_length, -1)  # (B, c, W)
        const = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)  # (B, k, W)
        hidden = self.transformer(torch.cat([tokens, const], dim=1))  # (B, c + k, W)
        return hidden[:, self.clip_length :]  # (B, k, W)


def build_mapper(config: MapperConfig, embedding_dim: int, lm_width: int) -> nn.Module:
    if config.type == "mlp":
        return MLPMapper(embedding_dim, lm_width, config.prefix_length)
    return TransformerMapper(
        embedding_dim, lm_width, config.prefix_length, config.clip_length,
        config.num_layers, config.num_heads,
    )
