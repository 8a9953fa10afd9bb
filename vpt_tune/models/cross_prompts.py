"""CVPT cross visual prompts: learnable prompts a block reads through cross-attention.

The prompts never join the self-attention sequence, which stays [prefix tokens, patches]. After the
self-attention residual, each prompted block adds CA(x, P): queries from the residual stream x itself,
keys and values from the block's raw (count, D) prompts (no norm on either side), softmax over the
prompts, then the output projection; no drop-path and no layer scale on this branch. Its q/k/v and
output projections are the block's own frozen ``attn.qkv`` (split into q, k, v) and ``attn.proj``
("weight sharing"), biases included, so only the prompts are new. Position: the authors' default
(``insert=3``): x + attn(norm1(x)), then + CA(x, P), then + mlp(norm2(x)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


class CrossPrompts(nn.Module):
    """Learnable cross-attention prompts of every block with a non-zero count, drawn from U(-b, b).

    ``tokens[str(i)]`` is block i's (count, D) tensor; ``forward(block)`` returns it.
    """

    def __init__(self, counts: Sequence[int], embed_dim: int, init_bound: float):
        super().__init__()
        self.counts = [int(c) for c in counts]
        self.tokens = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(c, embed_dim)) for i, c in enumerate(self.counts) if c > 0}
        )
        self.reset_parameters(init_bound)

    @torch.no_grad()
    def reset_parameters(self, init_bound: float) -> None:
        """Draw the prompts from U(-init_bound, init_bound) (on CPU, block by block, so the values do
        not depend on the device)."""
        for tokens in self.tokens.values():
            tokens.copy_(torch.empty(tokens.shape).uniform_(-init_bound, init_bound))

    def forward(self, block: int) -> torch.Tensor:
        return self.tokens[str(block)]


class CrossPromptedBlock(nn.Module):
    """A frozen timm :class:`Block` plus CVPT's cross-attention to prompts; ``block`` is the original
    module itself (the same frozen weights, no copies), and the wrapper starts in its train/eval mode.

    ``prompts()`` returns the block's (P, D) prompts; they are read at every call, not stored here, so
    they stay parameters of their owner alone. Input and output: (B, N, D). The cross-attention follows
    ``attn.fused_attn`` like timm: ``F.scaled_dot_product_attention``, or the explicit matmul + softmax
    path that ``torch.utils.flop_counter`` can count on CPU.
    """

    def __init__(self, block: Block, prompts: Callable[[], torch.Tensor]):
        super().__init__()
        self.block = block
        self.prompts = prompts
        self.train(block.training)

    def cross_attention(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """CA(x, P): (B, N, D) queries attend over the (P, D) prompts; returns (B, N, D).

        Only qkv and proj are shared: like the authors' CrossAttention (which has none), the branch
        applies no ``q_norm``/``k_norm``, scale norm or gate even where the self-attention has them.
        """
        attn = self.block.attn
        B, N, _ = x.shape
        P, heads, d = prompts.shape[0], attn.num_heads, attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(x, weight[: attn.attn_dim], None if bias is None else bias[: attn.attn_dim])
        kv = F.linear(prompts, weight[attn.attn_dim :], None if bias is None else bias[attn.attn_dim :])
        q = q.reshape(B, N, heads, d).transpose(1, 2)  # (B, heads, N, d)
        kv = kv.reshape(P, 2, heads, d).permute(1, 2, 0, 3).unsqueeze(1)  # (2, 1, heads, P, d)
        k, v = kv.expand(-1, B, -1, -1, -1).unbind(0)  # (B, heads, P, d)
        if attn.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        else:
            x = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        return attn.proj_drop(attn.proj(x.transpose(1, 2).reshape(B, N, attn.attn_dim)))

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b = self.block  # the mask, if any, is the self-attention's: every token sees every prompt
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.cross_attention(x, self.prompts())
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def add_cross_prompts(vit: VisionTransformer, counts: Sequence[int], init_bound: float) -> CrossPrompts:
    """CVPT prompts for ``vit`` (``counts`` per block, deep only), installed by replacing every block
    with a non-zero count in ``vit.blocks`` by a :class:`CrossPromptedBlock`. Returns the prompts."""
    for i, (block, count) in enumerate(zip(vit.blocks, counts)):
        if isinstance(block, CrossPromptedBlock):
            raise ValueError(f"block {i} already carries CVPT prompts (of another model): give each model its own")
        if count > 0 and (type(block) is not Block or type(getattr(block, "attn", None)) is not Attention):
            found = f"{type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}"
            raise ValueError(f"CVPT prompts need a timm Block with a timm Attention; block {i} is a {found}")
    prompts = CrossPrompts(counts, vit.embed_dim, init_bound)
    for i, count in enumerate(counts):
        if count > 0:
            vit.blocks[i] = CrossPromptedBlock(vit.blocks[i], partial(prompts, i))
    return prompts


def cross_attention_macs(tokens: int, prompts: int, embed_dim: int) -> int:
    """Multiply-adds of one block's cross-attention branch (matmuls only): q and out projections
    2·N·D², k and v projections 2·P·D², scores and weighted sum 2·N·P·D."""
    D = embed_dim
    return 2 * tokens * D * D + 2 * prompts * D * D + 2 * tokens * prompts * D
