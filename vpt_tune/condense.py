"""Prompt Condensation (Kim et al., "Do We Really Need a Large Number of Visual Prompts?").

After training with T prompts per block: score every prompt with a first-order Taylor estimate of
the loss change if it were removed, accumulated over the training set; keep the most important
``ceil((1 - ratio) * total)`` prompts globally across blocks (or per block); drop the rest from the
model, so the condensed model really runs fewer tokens. Fine-tuning the kept prompts and the head
is an ordinary training run of the condensed model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vpt_tune.data.splits import Batched
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.models.prompts import VisualPrompts


def prompt_importance(
    model: nn.Module, prompted: PromptedViT, split: Batched, batch_size: int, device: torch.device
) -> dict[int, torch.Tensor]:
    """Per fresh block, one score per prompt: sum over batches of |<dL/dP_p, P_p>|.

    ``<dL/dP_p, P_p>`` is the first-order change of the loss when prompt p is scaled to zero
    (its gate's gradient); ``model`` is what runs the batches (``prompted`` or a prefix-cached
    wrapper of it). Prompt dropout is off while scoring.
    """
    tokens = prompted.prompts.tokens
    scores = {int(i): torch.zeros(len(p), device=p.device) for i, p in tokens.items()}
    model.eval()
    for inputs, labels in split.batches(batch_size):
        loss = nn.functional.cross_entropy(model(inputs.to(device)), labels.to(device))
        grads = torch.autograd.grad(loss, list(tokens.values()), allow_unused=True)
        for (i, p), grad in zip(tokens.items(), grads):
            if grad is not None:
                scores[int(i)] += (grad * p).sum(dim=1).abs().detach()
    return scores


def removed_count(count: int, ratio: float) -> int:
    """How many of ``count`` items a removal ``ratio`` drops: floor(count * ratio), so ceil((1 - ratio) * count)
    stay; the epsilon absorbs float rounding (0.7 * 10 = 7.000000000000001 but 10 * (1 - 0.7) = 3.0000000000000004)."""
    return math.floor(count * ratio + 1e-9)


def select_prompts(scores: dict[int, torch.Tensor], ratio: float, per_block: bool = False) -> dict[int, list[int]]:
    """Indices of the prompts to keep per block: the top ``ceil((1 - ratio) * n)`` of all ``n`` scored
    prompts (globally across blocks), or of each block's own prompts with ``per_block``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"condensation ratio must be in [0, 1), got {ratio}")
    if per_block:
        return {
            block: sorted(s.topk(len(s) - removed_count(len(s), ratio)).indices.tolist()) for block, s in scores.items()
        }
    flat = [(score, block, index) for block, s in scores.items() for index, score in enumerate(s.tolist())]
    keep = len(flat) - removed_count(len(flat), ratio)
    chosen = sorted(flat, key=lambda item: -item[0])[:keep]
    return {block: sorted(index for _, b, index in chosen if b == block) for block in scores}


@torch.no_grad()
def condense_(model: PromptedViT, kept: dict[int, list[int]]) -> PromptedViT:
    """Drop every prompt not in ``kept`` from ``model`` in place; blocks keep replacing their prompts
    (possibly with none), so the condensed model equals the full one with those prompts removed. The
    model's prompt transforms are told which prompts stay."""
    old = model.prompts
    counts = [len(kept.get(i, [])) if new else 0 for i, new in enumerate(old.fresh)]
    masks = {i: old.mask(i)[kept.get(i, [])] for i in range(len(counts)) if old.mask(i) is not None}
    condensed = VisualPrompts(counts, old.embed_dim, 0.0, old.dropout.p, fresh=old.fresh, masks=masks)
    condensed.to(model.head.weight)  # the model's device and dtype, before the kept values are copied in
    for block, indices in kept.items():
        condensed.tokens[str(block)].copy_(old.tokens[str(block)][indices])
    model.prompts = condensed
    for transform in model.prompt_transforms.values():
        transform.keep_(kept)
    return model
