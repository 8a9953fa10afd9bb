"""PromptedViT: a frozen timm ViT with VPT (and E²VPT key/value) prompts and a new linear head; only those train."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpt_tune.models.backbone import freeze
from vpt_tune.models.kv_prompts import KVPosition, KVPrompts, add_kv_prompts
from vpt_tune.models.prompts import VisualPrompts, uniform_init_bound


class PromptedViT(nn.Module):
    """Frozen ``backbone`` + :class:`VisualPrompts` (``counts`` fresh prompts per block) + linear head,
    optionally + E²VPT :class:`KVPrompts` (``kv_counts`` key/value prompts per block, None = none)
    and E²VPT gates on the visual prompts (``gated``, see :class:`VisualPrompts`).

    Sequence layout per block: ``[prefix (class + register tokens), prompts, patches]``; prompts
    carry no position embedding. Blocks with KV prompts get a :class:`KVPromptedAttention` as
    ``attn``; the others keep timm's. Input: images (B, 3, H, W); output: logits (B, num_classes).

    Methods may add ``prompt_transforms`` (by method name): modules called as ``transform(block, prompts)``
    on each block's fresh prompts (B, T, D) before they join the sequence, with ``keep_(kept)`` called when
    only the prompts ``kept`` (sorted indices per block) stay (condensation, pruning); e.g. VFPT's. A method
    that changes blocks itself (CVPT's cross-attention, SSF, full fine-tuning) lowers ``first_changed_block``
    (a job's model: set from its methods' ``first_block``).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        counts: Sequence[int],
        prompt_dropout: float = 0.0,
        kv_counts: Sequence[int] | None = None,
        kv_shared: bool = True,
        kv_position: KVPosition = "prepend",
        gated: bool = False,
    ):
        super().__init__()
        depth = len(backbone.blocks)
        kv_counts = [0] * depth if kv_counts is None else kv_counts
        for name, given in (("prompt", counts), ("KV prompt", kv_counts)):
            if len(given) != depth:
                raise ValueError(f"need one {name} count per block ({depth}), got {len(given)}")
        self.backbone = freeze(backbone)
        self.prompts = VisualPrompts(counts, backbone.embed_dim, self.init_bound, prompt_dropout, gated=gated)
        self.kv_prompts = add_kv_prompts(backbone, kv_counts, kv_shared, kv_position)
        self.head = _new_head(backbone.embed_dim, num_classes)
        self.prompt_transforms = nn.ModuleDict()
        self.first_changed_block = depth  # the first block a method changes beyond the prompts (0: the embedding too)

    @property
    def init_bound(self) -> float:
        """VPT's uniform init bound of the visual prompts for this backbone."""
        return uniform_init_bound(self.backbone.patch_embed.patch_size[0], self.backbone.embed_dim)

    @torch.no_grad()
    def reset_parameters(self) -> "PromptedViT":
        """Draw the visual prompts, KV prompts and head afresh from their initial distributions (torch's
        CPU generator, whatever the device) and set the gates to 1; counts and masks stay."""
        self.prompts.reset_parameters(self.init_bound)
        kv = self.kv_prompts
        heads, _, head_dim = next((t.shape for t in kv.key.values()), (0, 0, 0))
        kv.load_state_dict(KVPrompts(kv.counts, heads, head_dim, kv.value is None).state_dict())
        self.head.load_state_dict(_new_head(self.head.in_features, self.head.out_features).state_dict())
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not the frozen backbone (prompts, segment masks, gates, KV prompts, head, and
        backbone parameters a method trains: SSF's, full fine-tuning's), on CPU."""
        trained = {f"backbone.{name}" for name, p in self.backbone.named_parameters() if p.requires_grad}
        return {k: t.detach().cpu().clone() for k, t in self.state_dict().items()
                if not k.startswith("backbone.") or k in trained}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> "PromptedViT":
        """Load a :meth:`trainable_state`, first reshaping the visual prompts to the state's per-block
        counts, masks and gates (a pruned, condensed or gated model saved from a model built like this
        one). The prompts take this model's device and dtype, not the state's."""
        old = self.prompts
        counts = [len(state[f"prompts.tokens.{i}"]) if f"prompts.tokens.{i}" in state else 0
                  for i in range(len(old.counts))]
        masks = {i: state[f"prompts.masks.{i}"] for i in range(len(counts)) if f"prompts.masks.{i}" in state}
        self.prompts = VisualPrompts(
            counts, old.embed_dim, 0.0, old.dropout.p, fresh=old.fresh, masks=masks, gated="prompts.token_gate" in state
        )
        self.prompts.to(self.head.weight)  # device and dtype
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"state does not fit this model: missing {missing}, unexpected {unexpected}")
        return self

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

    @property
    def first_prompted_block(self) -> int:
        """The first block any prompt (visual or key/value) enters; earlier blocks are frozen functions
        of the image (len(blocks) when there are no prompts at all)."""
        blocks = zip(self.prompts.fresh, self.kv_prompts.counts)
        first = next((i for i, (fresh, kv) in enumerate(blocks) if fresh or kv), len(self.prompts.counts))
        return min(first, self.first_changed_block)

    @torch.no_grad()
    def frozen_prefix(self, images: torch.Tensor, start: int) -> torch.Tensor:
        """The input tokens of block ``start`` (< :attr:`first_prompted_block`): (B, prefix+N, D)."""
        if start > self.first_prompted_block:
            raise ValueError(f"block {start} is after the first prompted block {self.first_prompted_block}")
        x = self.embed(images)
        for block in self.backbone.blocks[:start]:
            x = block(x)
        return x

    def forward_blocks(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run blocks ``start``.. on their input tokens, inserting or carrying prompts; final norm applied."""
        vit, prefix, carried = self.backbone, self.backbone.num_prefix_tokens, 0
        for i in range(start, len(vit.blocks)):
            if self.prompts.fresh[i] and (self.prompts.counts[i] or carried):  # (nothing to swap: no copy)
                fresh = self.prompts(i, x.shape[0])
                for transform in self.prompt_transforms.values():
                    fresh = transform(i, fresh)
                x = torch.cat([x[:, :prefix], fresh, x[:, prefix + carried:]], dim=1)
                carried = fresh.shape[1]
            x = vit.blocks[i](x)
        return vit.norm(x)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the input tokens of block ``start`` (see :meth:`frozen_prefix`)."""
        return self.head(self.forward_blocks(x, start)[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.embed(images), 0)


def _new_head(embed_dim: int, num_classes: int) -> nn.Linear:
    """A linear head on the class token: weights truncated-normal (std 0.02), bias 0."""
    head = nn.Linear(embed_dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head
