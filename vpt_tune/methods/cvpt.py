"""CVPT (Huang et al., "Cross Visual Prompt Tuning", ICCV 2025; reference code Lingyun0419/CVPT).

Prompts never join the self-attention sequence: each prompted block adds a cross-attention from its
tokens to its prompts, sharing the block's frozen attention weights (:mod:`vpt_tune.models.cross_prompts`).
The placement entries choose the prompted blocks as for VPT (the authors prompt every block).

Costs: ``prompt_tokens`` is 0 (nothing joins the sequence); the prompts are reported as ``kv_tokens``
(prompts attended to, not in the sequence, as E²VPT's key/value prompts) and ``gflops`` adds each
prompted block's cross-attention, 2·N·D² + 2·P·D² + 2·N·P·D, not VPT's (N + T)² attention.
Initialisation: the authors' Xavier-uniform bound of their (blocks, P, D) prompt tensor, sqrt(6 / ((P + L)·D)).
Not here: the authors' prompt dropout (0.1) on this branch; ``prompt_dropout`` does not reach CVPT's prompts.
"""

from __future__ import annotations

import math
from typing import Any

from vpt_tune.methods.base import Method


class CVPT(Method):
    name = "cvpt"
    summary = "Cross Visual Prompt Tuning: prompts outside the sequence, read by a cross-attention sharing the block's weights"
    main = True
    sequence_prompts = False

    def model_arguments(self, job, depth: int) -> dict[str, Any]:
        return {"counts": [0] * depth}  # no prompt joins the sequence

    def first_block(self, job, depth: int) -> int:
        counts = job.counts(depth)
        return next((i for i, count in enumerate(counts) if count), depth)

    def install(self, model, job) -> None:
        from vpt_tune.models.cross_prompts import add_cross_prompts

        vit = model.backbone
        counts = job.counts(len(vit.blocks))
        prompted = sum(1 for count in counts if count)
        bound = math.sqrt(6 / ((max(counts) + prompted) * vit.embed_dim)) if prompted else 0.0
        model.cross_prompts = add_cross_prompts(vit, counts, bound)

    def cost_terms(self, job, shape, counts, fresh):
        return _terms(shape, job.counts(shape.depth))

    def model_cost_terms(self, model, job):
        from vpt_tune.cost import ViTShape

        return _terms(ViTShape.of(model.backbone), model.cross_prompts.counts)


def _terms(shape, counts: list[int]):
    """Each prompted block's cross-attention over the image tokens, and its prompts' parameters."""
    from vpt_tune.cost import CostTerms
    from vpt_tune.models.cross_prompts import cross_attention_macs

    tokens = shape.num_prefix_tokens + shape.num_patches
    return CostTerms(macs=sum(cross_attention_macs(tokens, count, shape.embed_dim) for count in counts if count),
                     params=sum(counts) * shape.embed_dim, kv_tokens=sum(counts) / shape.depth)
