"""SSF (Lian et al., NeurIPS 2022): a learnable per-channel scale and shift after every linear op and LayerNorm.

``y = x · scale + shift`` over the channels of the output of: the patch projection (before the class
token and the position table), and in every block ``norm1``, ``attn.qkv`` (3D wide), ``attn.proj``,
``norm2``, ``mlp.fc1`` (hidden wide, before the activation) and ``mlp.fc2``; and the final ``norm``.
Each pair lives inside the ViT as the child ``ssf`` of the frozen op it follows (state-dict keys such as
``blocks.0.attn.qkv.ssf.scale``) and is applied by a forward hook on that op, so the module tree, the
frozen weights and timm's forward (fused attention or not) stay as they are. After training,
:func:`merge_ssf_` folds every pair into its op's weights: zero extra inference FLOPs.

Count: 11·D channels per block plus 2·D outside (patch projection, final norm), each with one scale and
one shift. ViT-B/16 has 768·(2 + 12·11) = 102,912 channels, so 205,824 SSF scalars, the count the
authors' code (dongzelian/SSF) trains; 102,912 is the number of (scale, shift) pairs, not of scalars.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

BLOCK_OPS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class ScaleShift(nn.Module):
    """``x · scale + shift`` per channel, both (W,); the channel axis is the last one, or axis 1 of a
    (B, W, H, W') conv output (``channels_first``). Init as the authors: scale ~ N(1, 0.02), shift ~ N(0, 0.02)."""

    def __init__(self, width: int, channels_first: bool = False, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(width, device=device, dtype=dtype).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(width, device=device, dtype=dtype).normal_(0.0, 0.02))
        self.channels_first = channels_first
        self.handle: torch.utils.hooks.RemovableHandle | None = None  # the hook on the op it follows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return x * self.scale[:, None, None] + self.shift[:, None, None]
        return x * self.scale + self.shift


def _apply_ssf(op: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: the op's output, scaled and shifted by its ``ssf`` child."""
    return op.ssf(out)


def _targets(vit: VisionTransformer) -> list[tuple[str, nn.Module]]:
    """(name, op) of every op SSF follows, in forward order."""
    names = ["patch_embed.proj", *(f"blocks.{i}.{op}" for i in range(len(vit.blocks)) for op in BLOCK_OPS), "norm"]
    return [(name, vit.get_submodule(name)) for name in names]


def ssf_modules(vit: VisionTransformer) -> list[ScaleShift]:
    """The SSF pairs installed in ``vit``, in forward order (empty if none)."""
    return [m for m in vit.modules() if isinstance(m, ScaleShift)]


def ssf_parameter_count(vit: VisionTransformer) -> int:
    """SSF scalars :func:`add_ssf` installs on ``vit`` (before or after installing): 2 per output channel
    of every target op; 205,824 for ViT-B/16."""
    return 2 * sum(op.weight.shape[0] for _, op in _targets(vit))


def add_ssf(vit: VisionTransformer) -> list[ScaleShift]:
    """Install a trainable :class:`ScaleShift` after every target op of ``vit`` (in place; its own
    parameters keep their ``requires_grad``). Returns the installed pairs, in forward order."""
    if ssf_modules(vit):
        where = next(name for name, m in vit.named_modules() if isinstance(m, ScaleShift))
        raise ValueError(f"this backbone already carries SSF (at {where}): give each model its own backbone")
    for i, block in enumerate(vit.blocks):
        kinds = (type(block), type(getattr(block, "attn", None)), type(getattr(block, "mlp", None)))
        if kinds != (Block, Attention, Mlp):
            found = " with ".join(kind.__name__ for kind in kinds)
            raise ValueError(f"SSF needs plain timm Block/Attention/Mlp blocks; block {i} is a {found}")
    targets = _targets(vit)
    for name, op in targets:
        if not isinstance(op, (nn.Linear, nn.Conv2d, nn.LayerNorm)) or op.weight is None:
            found = type(op).__name__
            raise ValueError(f"SSF folds only into a Linear, Conv2d or affine LayerNorm; {name} is a {found}")
    for _, op in targets:
        weight = op.weight
        op.ssf = ScaleShift(weight.shape[0], isinstance(op, nn.Conv2d), weight.device, weight.dtype)
        op.ssf.handle = op.register_forward_hook(_apply_ssf)
    return ssf_modules(vit)


@torch.no_grad()
def merge_ssf_(vit: VisionTransformer) -> VisionTransformer:
    """Fold every SSF pair into the op it follows and remove it, in place; returns ``vit``, now a plain
    timm ViT (same modules, parameters and FLOPs as the backbone). With s, t a pair's scale and shift:
    Linear / Conv2d W' = diag(s)·W per output channel, LayerNorm weight' = weight·s; bias' = bias·s + t."""
    for name, op in _targets(vit):
        ssf: ScaleShift | None = getattr(op, "ssf", None)
        if ssf is None:
            raise ValueError(f"no SSF to merge at {name}: install it with add_ssf first")
        weight = op.weight
        weight.mul_(ssf.scale.view(-1, *[1] * (weight.dim() - 1)))
        if op.bias is None:
            op.bias = nn.Parameter(ssf.shift.clone(), requires_grad=weight.requires_grad)
        else:
            op.bias.mul_(ssf.scale).add_(ssf.shift)
        ssf.handle.remove()
        del op.ssf
    return vit
