"""E²VPT key/value prompts: learnable keys and values concatenated inside the attention of a block.

Per block a (heads, T_kv, head_dim) tensor joins the keys and the values after the frozen qkv
projection (and after ``k_norm``, if the model has one). Queries are unchanged, so the block's output
length is unchanged; the attention scores become (N, T_kv + N). Without a mask the order of the keys
does not change the result, so ``prepend`` and ``append`` differ only in rounding (and in where a mask
gets its extra, always-visible columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import VisionTransformer
from torch import nn

KVPosition = Literal["prepend", "append"]


def _kaiming_uniform(num_heads: int, count: int, head_dim: int) -> nn.Parameter:
    """A (heads, count, head_dim) tensor, kaiming-uniform, fan-in = count·head_dim (the authors' init)."""
    tokens = torch.empty(num_heads, count, head_dim)
    nn.init.kaiming_uniform_(tokens, a=0, mode="fan_in", nonlinearity="leaky_relu")
    return nn.Parameter(tokens)


class KVPrompts(nn.Module):
    """Learnable key/value prompts of every block with a non-zero count.

    ``shared``: one tensor per block (``key``) serves as both key and value prompts (the authors'
    commands); otherwise ``key`` and ``value`` hold separate tensors (the paper's description).
    ``forward(block)`` returns that block's (key, value) prompts, each (heads, T_kv, head_dim).
    """

    def __init__(self, counts: Sequence[int], num_heads: int, head_dim: int, shared: bool = True):
        super().__init__()
        self.counts = [int(c) for c in counts]

        def tensors() -> nn.ParameterDict:
            return nn.ParameterDict(
                {str(i): _kaiming_uniform(num_heads, c, head_dim) for i, c in enumerate(self.counts) if c > 0}
            )

        self.key = tensors()
        self.value = None if shared else tensors()

    def forward(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.key[str(block)]
        return key, key if self.value is None else self.value[str(block)]


class KVPromptedAttention(nn.Module):
    """A frozen timm :class:`Attention` with key/value prompts; ``attn`` is the original module itself
    (the same frozen weights, no copies), and the wrapper starts in its train/eval mode.

    ``kv()`` returns the block's (key, value) prompts, each (heads, T_kv, head_dim); they are read at
    every call, not stored here, so they stay parameters of their owner alone. Input and output:
    (B, N, D). Follows ``attn.fused_attn`` like timm: ``F.scaled_dot_product_attention``, or the
    explicit matmul + softmax path that ``torch.utils.flop_counter`` can count on CPU.
    """

    def __init__(self, attn: Attention, kv: Callable[[], tuple[torch.Tensor, torch.Tensor]], append: bool = False):
        super().__init__()
        self.attn = attn
        self.kv = kv
        self.append = append
        self.train(attn.training)

    def _join(self, prompts: torch.Tensor, tokens: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Concatenate along the key axis: prompts before (prepend) or after (append) the tokens."""
        return torch.cat([tokens, prompts] if self.append else [prompts, tokens], dim=dim)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        attn = self.attn
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        key, value = (t.to(k.dtype).expand(B, -1, -1, -1) for t in self.kv())
        k, v = self._join(key, k), self._join(value, v)  # (B, heads, T_kv + N, head_dim)
        bias = resolve_self_attn_mask(N, q, attn_mask, is_causal)  # (..., N, N) additive, or None
        if bias is not None:  # every query sees every prompt
            bias = self._join(bias.new_zeros(*bias.shape[:-1], key.shape[2]), bias, dim=-1)
        if attn.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if self.training else 0.0
            )
        else:
            scores = maybe_add_mask((q * attn.scale) @ k.transpose(-2, -1), bias)
            x = attn.attn_drop(scores.softmax(dim=-1)) @ v
        x = attn.norm(x.transpose(1, 2).reshape(B, N, attn.attn_dim))
        if gate is not None:
            x = x * gate
        return attn.proj_drop(attn.proj(x))


def add_kv_prompts(
    vit: VisionTransformer, counts: Sequence[int], shared: bool = True, position: KVPosition = "prepend"
) -> KVPrompts:
    """Key/value prompts for ``vit`` (``counts`` per block), installed as :class:`KVPromptedAttention`
    in every block with a non-zero count; blocks without keep their attention. Returns the prompts."""
    if position not in ("prepend", "append"):
        raise ValueError(f"KV prompt position must be 'prepend' or 'append', got {position!r}")
    attns = [getattr(block, "attn", None) for block in vit.blocks]
    if any(isinstance(attn, KVPromptedAttention) for attn in attns):
        raise ValueError("this backbone already carries KV prompts (of another model): give each model its own")
    for i, (attn, count) in enumerate(zip(attns, counts)):
        if count > 0 and type(attn) is not Attention:
            found = f"{type(vit.blocks[i]).__name__} with {type(attn).__name__}"
            raise ValueError(f"KV prompts need a timm Attention as `attn`; block {i} is a {found}")
    heads, head_dim = next(((a.num_heads, a.head_dim) for a, c in zip(attns, counts) if c > 0), (0, 0))
    prompts = KVPrompts(counts, heads, head_dim, shared)
    for i, block in enumerate(vit.blocks):
        if counts[i] > 0:
            block.attn = KVPromptedAttention(block.attn, partial(prompts, i), append=position == "append")
    return prompts
