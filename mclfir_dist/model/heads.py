"""ASEN-v2-style attribute head: 1x1 projection, attribute-aware spatial attention,
attribute-aware channel gate, linear to the embedding, L2 normalisation.

A frozen head is put in eval mode, so it is a pure function of its (unchanging) weights and statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttributeHead(nn.Module):
    def __init__(self, in_channels: int, channels: int = 256, embed_dim: int = 128):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, kernel_size=1)
        # GroupNorm: scale-free input to the attention whatever the trunk's feature magnitude,
        # and no running statistics, so a frozen head never changes
        self.norm = nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
        self.attribute = nn.Parameter(torch.randn(channels) * 0.1)  # learned attribute vector
        self.query = nn.Linear(channels, channels)
        self.gate = nn.Sequential(nn.Linear(2 * channels, channels // 2), nn.ReLU(inplace=True),
                                  nn.Linear(channels // 2, channels), nn.Sigmoid())
        # BatchNorm1d centres the pooled vector: pooled features of different images share a large
        # common component, which would make all embeddings alike at init (InfoNCE then stalls at log N).
        # Frozen heads run in eval mode, so their running statistics never change either.
        self.center = nn.BatchNorm1d(channels)
        self.out = nn.Linear(channels, embed_dim)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.proj(fmap)))                                 # B C H W
        q = torch.tanh(self.query(self.attribute))                    # C
        logits = torch.einsum("bchw,c->bhw", torch.tanh(x), q) * self.scale
        attn = logits.flatten(1).softmax(dim=1).view_as(logits)       # spatial attention
        v = torch.einsum("bchw,bhw->bc", x, attn)
        a = self.attribute.expand(v.shape[0], -1)
        v = v * self.gate(torch.cat([v, a], dim=1))                   # channel attention
        return F.normalize(self.out(self.center(v)), dim=1)
