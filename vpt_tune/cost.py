"""Cost of a prompted ViT known before training: prompt tokens, trainable parameters, GFLOPs.

FLOPs follow the papers' convention (one multiply-add = one FLOP): per block with N tokens,
width D and MLP ratio r, ``(4 + 2r)·N·D² + 2·N·(N + T_kv)·D`` where T_kv is the block's E²VPT
key/value prompts (they only lengthen the keys and values); plus the patch embedding
``N_patches·D·C·p²`` and the head ``D·classes``. ``torch.utils.flop_counter`` counts 2 per multiply-add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from timm.models.vision_transformer import VisionTransformer

from vpt_tune.models.backbone import architecture
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
            mlp_hidden=next(m.fc1.out_features for m in vit.blocks[0].modules() if hasattr(m, "fc1")),  # (wrapped too)
            patch_area=patch[0] * patch[1],
            in_chans=vit.patch_embed.proj.in_channels,
            num_patches=vit.patch_embed.num_patches,
            num_prefix_tokens=vit.num_prefix_tokens,
        )

    @classmethod
    def for_model(cls, model: str, img_size: int) -> "ViTShape":
        """The shape of timm ``model`` at ``img_size`` (a :class:`ModelError` unless a timm ViT)."""
        return cls.of(architecture(model, img_size))


@dataclass(frozen=True)
class Cost:
    """Cost figures of one prompted configuration."""

    prompt_tokens: float  # mean visual prompt tokens in the sequence over blocks
    kv_tokens: float  # mean E²VPT key/value prompts over blocks (extra keys and values, not in the sequence)
    trainable_params: int
    gflops: float  # per image forward, multiply-adds

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class CostTerms:
    """A method's cost beyond the visual prompts in the sequence: multiply-adds per image, trainable
    parameters (negative: entries that do not train) and mean key/value prompts per block."""

    macs: int = 0
    params: int = 0
    kv_tokens: float = 0.0


def block_macs(tokens: int, shape: ViTShape, kv_tokens: int = 0) -> int:
    """Multiply-adds of one transformer block over ``tokens`` tokens with ``kv_tokens`` KV prompts."""
    d = shape.embed_dim
    linear = tokens * d * (4 * d + 2 * shape.mlp_hidden)  # qkv (3D²) + proj (D²) + MLP (2·D·hidden)
    attention = 2 * tokens * (tokens + kv_tokens) * d  # Q·Kᵀ and attn·V over the prompted keys/values
    return linear + attention


def _check_counts(shape: ViTShape, name: str, given: Sequence[int]) -> None:
    if len(given) != shape.depth:
        raise ValueError(f"need one {name} count per block ({shape.depth}), got {len(given)}")
    if any(c < 0 for c in given):
        raise ValueError(f"{name} counts must be >= 0, got {list(given)}")


def kv_attention_terms(
    shape: ViTShape, counts: Sequence[int], fresh: Sequence[bool] | None, kv_counts: Sequence[int], kv_shared: bool = True
) -> CostTerms:
    """E²VPT's key/value prompts: the extra keys and values every query of a block attends to, over the
    block's tokens (prompts included, as ``counts`` and ``fresh`` place them); heads·T_kv·head_dim = T_kv·D
    parameters per block, twice that when keys and values are separate tensors (not ``kv_shared``)."""
    _check_counts(shape, "KV prompt", kv_counts)
    base = shape.num_prefix_tokens + shape.num_patches
    present = tokens_per_block(counts, fresh)
    return CostTerms(
        macs=sum(2 * (base + p) * kv * shape.embed_dim for p, kv in zip(present, kv_counts)),
        params=sum(kv_counts) * shape.embed_dim * (1 if kv_shared else 2),
        kv_tokens=sum(kv_counts) / shape.depth,
    )


def prompted_cost(
    shape: ViTShape,
    counts: Sequence[int],
    num_classes: int = 0,
    kv_counts: Sequence[int] | None = None,
    kv_shared: bool = True,
    fresh: Sequence[bool] | None = None,
    terms: Sequence[CostTerms | None] = (),
) -> Cost:
    """Cost of ``shape`` with ``counts`` fresh prompts and ``kv_counts`` KV prompts (None: none, see
    :func:`kv_attention_terms`) per block, a ``num_classes`` head and other methods' ``terms``; ``fresh``
    marks the blocks that replace the prompts (default: ``counts > 0``; condensed models may replace with 0)."""
    _check_counts(shape, "prompt", counts)
    terms = [t for t in terms if t is not None]
    if kv_counts is not None:
        terms.append(kv_attention_terms(shape, counts, fresh, kv_counts, kv_shared))
    present = tokens_per_block(counts, fresh)
    base = shape.num_prefix_tokens + shape.num_patches
    macs = shape.num_patches * shape.embed_dim * shape.in_chans * shape.patch_area
    macs += sum(block_macs(base + p, shape) for p in present)
    macs += shape.embed_dim * num_classes + sum(t.macs for t in terms)
    head_params = (shape.embed_dim + 1) * num_classes
    return Cost(
        prompt_tokens=sum(present) / shape.depth,
        kv_tokens=sum(t.kv_tokens for t in terms),
        trainable_params=sum(counts) * shape.embed_dim + head_params + sum(t.params for t in terms),
        gflops=macs / 1e9,
    )
