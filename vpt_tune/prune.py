"""E²VPT prompt pruning (Han et al., ICCV 2023), with pruned tokens physically removed.

E²VPT multiplies the visual prompts by gates shared by every block: a token gate per prompt index k
and a segment gate per (k, s), where segment s holds the embedding dimensions d with d mod 16 = s.
After training, every gate is scored by the loss gradient with respect to it, averaged over the
training batches; the lowest-scored ``token_ratio`` of the tokens are pruned, then the lowest-scored
segments of each kept token, and the model is rewound and retrained with the masks fixed. Two
scorings (``e2vpt.prune_scoring``; the rewind itself is in :mod:`vpt_tune.train.job`):

- ``authors`` (what ChengHan111/E2VPT does, the default): the gates are trainable parameters during
  the training before pruning (:class:`~vpt_tune.models.prompts.VisualPrompts` built ``gated``),
  scored at their trained values by the mean of the *signed* gradient, so the most negative are
  pruned; at most :data:`MAX_PRUNED_SEGMENTS` of a token's 16 segments are pruned; the rewind draws
  fresh prompts, KV prompts and head from their initial distributions.
- ``ours``: no gates are trained; a gate's score is |dL/d gate| at gate = 1, which equals
  |sum_blocks <dL/dP, P>| over the entries it scales, so it comes from the prompts' own gradients;
  no cap on the segments; the rewind restores the exact initial values (lottery-ticket style).

Ours in both: pruned tokens are removed from the sequence instead of multiplied by zero, so the
compute really drops; pruned segments (parts of a token's dimensions) cannot shrink the sequence and
stay a fixed 0/1 mask, which removes their parameters only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpt_tune.condense import condense_, removed_count
from vpt_tune.data.splits import Batched
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.models.prompts import SEGMENTS, segment_of

PRUNE_SCORINGS = ("authors", "ours")
MAX_PRUNED_SEGMENTS = 12  # the authors keep at least 4 of a token's 16 segments (MIN_NUMBER_CLS_TOKEN_PIECE)


@dataclass
class GateScores:
    """Importance of every token gate (T,) and segment gate (T, 16)."""

    tokens: torch.Tensor
    segments: torch.Tensor


def shared_count(model: PromptedViT) -> int:
    """The prompt count every fresh block has (the gates are shared across blocks, so they must agree)."""
    counts = {len(p) for p in model.prompts.tokens.values()}
    if len(counts) != 1:
        raise ValueError(f"E²VPT pruning needs the same prompt count in every prompted block, got {sorted(counts)}")
    return counts.pop()


def gate_importance(
    model: nn.Module, prompted: PromptedViT, split: Batched, batch_size: int, device: torch.device
) -> GateScores:
    """Mean over the training batches of every token and segment gate's score.

    With gate parameters (``authors``): the signed dL/d gate at the gates' current (trained) values.
    Without (``ours``): |dL/d gate| at gate = 1, from the prompts' gradients. ``model`` runs the
    batches (``prompted`` itself or a prefix-cached wrapper of it). Prompt dropout is off while scoring.
    """
    prompts = prompted.prompts
    count, tokens = shared_count(prompted), list(prompts.tokens.values())
    segment = segment_of(prompts.embed_dim).to(tokens[0].device)
    token_scores, segment_scores = tokens[0].new_zeros(count), tokens[0].new_zeros(count, SEGMENTS)
    batches = 0
    model.eval()
    for inputs, labels in split.batches(batch_size):
        loss = nn.functional.cross_entropy(model(inputs.to(device)), labels.to(device))
        if prompts.gated:
            token, by_segment = torch.autograd.grad(loss, [prompts.token_gate, prompts.segment_gate])
        else:
            # d loss / d gate at gate = 1 is <dL/dP, P> summed over the entries the gate scales, in every block
            per_entry = tokens[0].new_zeros(count, prompts.embed_dim)
            for grad, p in zip(torch.autograd.grad(loss, tokens, allow_unused=True), tokens):
                if grad is not None:
                    per_entry += grad * p.detach()
            token = per_entry.sum(dim=1).abs()
            by_segment = tokens[0].new_zeros(count, SEGMENTS).index_add_(1, segment, per_entry).abs()
        token_scores += token
        segment_scores += by_segment
        batches += 1
    if batches == 0:
        raise ValueError("cannot score prompt gates on an empty split")
    return GateScores(token_scores / batches, segment_scores / batches)


def select_gates(
    scores: GateScores, token_ratio: float, segment_ratio: float, max_pruned_segments: int | None = None
) -> tuple[list[int], torch.Tensor]:
    """The prompt indices to keep and, per kept prompt, a 0/1 mask over its 16 segments: the
    ``floor(token_ratio * T)`` lowest-scored tokens are pruned, then the ``floor(segment_ratio * 16)``
    lowest-scored segments of each kept token (at most ``max_pruned_segments``)."""
    for name, ratio in (("token", token_ratio), ("segment", segment_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{name} prune ratio must be in [0, 1), got {ratio}")
    count = len(scores.tokens)
    kept = sorted(scores.tokens.topk(count - removed_count(count, token_ratio)).indices.tolist())
    pruned_segments = removed_count(SEGMENTS, segment_ratio)
    if max_pruned_segments is not None:
        pruned_segments = min(pruned_segments, max_pruned_segments)
    segments = scores.segments[kept]
    pruned = segments.argsort(dim=1)[:, :pruned_segments]
    keep_segments = torch.ones_like(segments).scatter_(1, pruned, 0.0)
    return kept, keep_segments


@torch.no_grad()
def prune_(model: PromptedViT, kept: list[int], keep_segments: torch.Tensor) -> PromptedViT:
    """Remove the prompts not in ``kept`` from every block and fix the segment masks, in place. Gates,
    if any, are folded into the prompts and dropped: the authors freeze them for the retraining."""
    gate = model.prompts.gate()
    if gate is not None:
        for tokens in model.prompts.tokens.values():
            tokens.mul_(gate)
    blocks = [int(i) for i in model.prompts.tokens]
    condense_(model, {block: kept for block in blocks})  # builds the prompts anew, without gates
    mask = keep_segments[:, segment_of(model.prompts.embed_dim).to(keep_segments.device)]  # (kept, D)
    for block in blocks:
        tokens = model.prompts.tokens[str(block)]
        model.prompts.masks.register_buffer(str(block), mask.to(tokens).clone())
        tokens.mul_(model.prompts.mask(block))  # masked entries are zero, not merely ignored
    return model


def masked_entries(model: PromptedViT) -> int:
    """Prompt parameters switched off by segment masks (they no longer count as trainable)."""
    masks = (model.prompts.mask(int(i)) for i in model.prompts.tokens)
    return sum(int((mask == 0).sum()) for mask in masks if mask is not None)
