"""PromptedViT: a frozen timm ViT with VPT prompts and a new linear head; only those train."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpt_tune.models.backbone import freeze
from vpt_tune.models.prompts import VisualPrompts, uniform_init_bound


class PromptedViT(nn.Module):
    """Frozen ``backbone`` + :class:`VisualPrompts` (``counts`` fresh prompts per block) + linear head.

    Sequence layout per block: ``[prefix (class + register tokens), prompts, patches]``; prompts
    carry no position embedding. Input: images (B, 3, H, W); output: logits (B, num_classes).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        counts: Sequence[int],
        prompt_dropout: float = 0.0,
    ):
        super().__init__()
        if len(counts) != len(backbone.blocks):
            raise ValueError(f"need one prompt count per block ({len(backbone.blocks)}), got {len(counts)}")
        self.backbone = freeze(backbone)
        patch = backbone.patch_embed.patch_size[0]
        self.prompts = VisualPrompts(
            counts, backbone.embed_dim, uniform_init_bound(patch, backbone.embed_dim), prompt_dropout
        )
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "PromptedViT":
        """Train mode for prompts and head only: the backbone stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + position embedding with class/register tokens, as timm does it: (B, prefix+N, D)."""
        vit = self.backbone
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run every block on embedded tokens, inserting or carrying prompts; final norm applied."""
        vit, prefix, carried = self.backbone, self.backbone.num_prefix_tokens, 0
        for i in range(len(vit.blocks)):
            if self.prompts.counts[i] > 0:
                fresh = self.prompts(i, x.shape[0])
                x = torch.cat([x[:, :prefix], fresh, x[:, prefix + carried:]], dim=1)
                carried = fresh.shape[1]
            x = vit.blocks[i](x)
        return vit.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_blocks(self.embed(images))[:, 0])
