"""Cost of a prompted ViT known before training: prompt tokens, trainable parameters, GFLOPs.

FLOPs follow the papers' convention (one multiply-add = one FLOP): per block with N tokens,
width D and MLP ratio r, ``(4 + 2r)·N·D² + 2·N²·D``; plus the patch embedding ``N_patches·D·C·p²``
and the head ``D·classes``. ``torch.utils.flop_counter`` counts 2 per multiply-add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vpt_tune.models.placement import tokens_per_block


@dataclass(frozen=True)
class ViTShape:
    """The dimensions of a ViT that its cost depends on."""

    depth: int
    embed_dim: int
    mlp_hidden: int
    patch_area: int  # pixels per patch (p²)
    in_chans: int
    num_patches: int
    num_prefix_tokens: int

    @classmethod
    def of(cls, vit: VisionTransformer) -> "ViTShape":
        """Read the shape off a timm VisionTransformer."""
        patch = vit.patch_embed.patch_size
        return cls(
            depth=len(vit.blocks),
            embed_dim=vit.embed_dim,
            mlp_hidden=vit.blocks[0].mlp.fc1.out_features,
            patch_area=patch[0] * patch[1],
            in_chans=vit.patch_embed.proj.in_channels,
            num_patches=vit.patch_embed.num_patches,
            num_prefix_tokens=vit.num_prefix_tokens,
        )

    @classmethod
    def for_model(cls, model: str, img_size: int) -> "ViTShape":
        """The shape of timm ``model`` at ``img_size``, built on the meta device (no weights, instant)."""
        with torch.device("meta"):
            return cls.of(timm.create_model(model, pretrained=False, num_classes=0, img_size=img_size))


@dataclass(frozen=True)
class Cost:
    """Cost figures of one prompted configuration."""

    prompt_tokens: float  # mean prompt tokens in the sequence over blocks
    trainable_params: int
    gflops: float  # per image forward, multiply-adds

    def as_dict(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "trainable_params": self.trainable_params, "gflops": self.gflops}


def block_macs(tokens: int, shape: ViTShape) -> int:
    """Multiply-adds of one transformer block over ``tokens`` tokens."""
    d = shape.embed_dim
    linear = tokens * d * (4 * d + 2 * shape.mlp_hidden)  # qkv (3D²) + proj (D²) + MLP (2·D·hidden)
    attention = 2 * tokens * tokens * d  # Q·Kᵀ and attn·V
    return linear + attention


def prompted_cost(shape: ViTShape, counts: Sequence[int], num_classes: int = 0) -> Cost:
    """Cost of ``shape`` with ``counts`` fresh prompts per block and a ``num_classes`` head."""
    if len(counts) != shape.depth:
        raise ValueError(f"need one prompt count per block ({shape.depth}), got {len(counts)}")
    present = tokens_per_block(counts)
    base = shape.num_prefix_tokens + shape.num_patches
    macs = shape.num_patches * shape.embed_dim * shape.in_chans * shape.patch_area
    macs += sum(block_macs(base + p, shape) for p in present)
    macs += shape.embed_dim * num_classes
    head_params = (shape.embed_dim + 1) * num_classes
    return Cost(
        prompt_tokens=sum(present) / shape.depth,
        trainable_params=sum(counts) * shape.embed_dim + head_params,
        gflops=macs / 1e9,
    )
