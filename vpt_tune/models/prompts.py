"""VPT visual prompt tokens: initialisation, dropout, and the per-block parameters.

Which blocks get how many fresh prompts is decided in :mod:`vpt_tune.models.placement`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

SEGMENTS = 16  # E²VPT's segments per prompt token


def segment_of(embed_dim: int) -> torch.Tensor:
    """The E²VPT segment of every embedding dimension: d mod 16."""
    return torch.arange(embed_dim) % SEGMENTS


def uniform_init_bound(patch_size: int, embed_dim: int) -> float:
    """VPT's uniform init bound v = sqrt(6 / (3 p^2 + D)) (ViT-B/16: 0.0625)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))


class VisualPrompts(nn.Module):
    """Learnable prompt tokens for each block that inserts fresh prompts.

    ``fresh[i]`` (default ``counts[i] > 0``) says block i discards the previous prompts and inserts
    its own ``counts[i]`` (possibly 0, after condensation). ``forward(block, batch)`` returns the
    block's prompts as a (batch, count, D) tensor, with prompt dropout applied in training mode.

    ``masks`` (E²VPT segment pruning) maps a block to a fixed 0/1 (count, D) mask multiplied into
    its prompts, so masked entries neither act nor learn; the masks are buffers, saved with the model.

    ``gated`` (E²VPT before pruning, the authors' procedure): a trainable token gate (T,) and segment
    gate (T, 16), initialised to 1 and shared by every block (so every fresh block needs the same
    count T), multiply the prompts: entry (k, d) by ``token_gate[k] * segment_gate[k, d mod 16]``.
    They are parameters, so they train, are saved and are resumed with the prompts.
    """

    def __init__(
        self,
        counts: Sequence[int],
        embed_dim: int,
        init_bound: float,
        dropout: float = 0.0,
        fresh: Sequence[bool] | None = None,
        masks: dict[int, torch.Tensor] | None = None,
        gated: bool = False,
    ):
        super().__init__()
        self.counts = [int(c) for c in counts]
        self.fresh = [c > 0 for c in self.counts] if fresh is None else [bool(f) for f in fresh]
        self.embed_dim = embed_dim
        self.tokens = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(c, embed_dim)) for i, (c, new) in enumerate(zip(self.counts, self.fresh))
             if new}
        )
        self.dropout = nn.Dropout(dropout)
        self.masks = nn.Module()  # a buffer per masked block, named by its index
        for block, mask in (masks or {}).items():
            if tuple(mask.shape) != (self.counts[block], embed_dim):
                raise ValueError(f"block {block}: mask shape {tuple(mask.shape)} != {(self.counts[block], embed_dim)}")
            self.masks.register_buffer(str(block), mask.to(torch.float32))
        self.token_gate = self.segment_gate = None
        if gated:
            shared = sorted({len(t) for t in self.tokens.values()})
            if len(shared) != 1:
                raise ValueError(f"E²VPT gates need the same prompt count in every prompted block, got {shared}")
            count = shared[0]
            self.token_gate = nn.Parameter(torch.empty(count))
            self.segment_gate = nn.Parameter(torch.empty(count, SEGMENTS))
        self.reset_parameters(init_bound)

    @property
    def gated(self) -> bool:
        """Whether E²VPT gates multiply the prompts."""
        return self.token_gate is not None

    @torch.no_grad()
    def reset_parameters(self, init_bound: float) -> None:
        """Draw the prompts from U(-init_bound, init_bound) (on CPU, block by block, so the values do
        not depend on the device), masked entries zero, gates 1."""
        for block, tokens in self.tokens.items():
            tokens.copy_(torch.empty(tokens.shape).uniform_(-init_bound, init_bound))
            mask = self.mask(int(block))
            if mask is not None:
                tokens.mul_(mask)
        if self.gated:
            self.token_gate.fill_(1.0)
            self.segment_gate.fill_(1.0)

    def mask(self, block: int) -> torch.Tensor | None:
        """The fixed segment mask of ``block``'s prompts, or None."""
        return getattr(self.masks, str(block), None)

    def gate(self) -> torch.Tensor | None:
        """The (T, D) product of the token and segment gates, or None without gates."""
        if not self.gated:
            return None
        return self.token_gate[:, None] * self.segment_gate[:, segment_of(self.embed_dim).to(self.segment_gate.device)]

    def forward(self, block: int, batch: int) -> torch.Tensor:
        tokens, mask, gate = self.tokens[str(block)], self.mask(block), self.gate()
        if mask is not None:
            tokens = tokens * mask
        if gate is not None:
            tokens = tokens * gate
        return self.dropout(tokens.unsqueeze(0).expand(batch, -1, -1))
