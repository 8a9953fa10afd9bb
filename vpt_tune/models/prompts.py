"""VPT visual prompt tokens: initialisation, dropout, and the per-block parameters.

Which blocks get how many fresh prompts is decided in :mod:`vpt_tune.models.placement`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def uniform_init_bound(patch_size: int, embed_dim: int) -> float:
    """VPT's uniform init bound v = sqrt(6 / (3 p^2 + D)) (ViT-B/16: 0.0625)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))


class VisualPrompts(nn.Module):
    """Learnable prompt tokens for each block that inserts fresh prompts.

    ``fresh[i]`` (default ``counts[i] > 0``) says block i discards the previous prompts and inserts
    its own ``counts[i]`` (possibly 0, after condensation). ``forward(block, batch)`` returns the
    block's prompts as a (batch, count, D) tensor, with prompt dropout applied in training mode.
    """

    def __init__(
        self,
        counts: Sequence[int],
        embed_dim: int,
        init_bound: float,
        dropout: float = 0.0,
        fresh: Sequence[bool] | None = None,
    ):
        super().__init__()
        self.counts = [int(c) for c in counts]
        self.fresh = [c > 0 for c in self.counts] if fresh is None else [bool(f) for f in fresh]
        self.embed_dim = embed_dim
        self.tokens = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(c, embed_dim).uniform_(-init_bound, init_bound))
             for i, (c, new) in enumerate(zip(self.counts, self.fresh)) if new}
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, block: int, batch: int) -> torch.Tensor:
        return self.dropout(self.tokens[str(block)].unsqueeze(0).expand(batch, -1, -1))
