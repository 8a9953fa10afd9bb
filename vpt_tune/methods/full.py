"""Full fine-tuning: a reference point on a front (VPT, Jia et al., ECCV 2022, reports it as "Full").

Every backbone parameter trains with the head; no prompt joins the sequence (the spec's ``num_prompts``
/ ``placement`` reach its jobs and are ignored) and no frozen prefix is cached. Costs: 0 prompt tokens,
the plain backbone's GFLOPs, every parameter trainable (backbone and head). A trial's checkpoints
hold the whole backbone.

:meth:`PromptedViT.train` keeps the backbone in eval mode: harmless here, since our backbones are built
without dropout or drop-path (and a ViT has no batch norm), so train and eval mode compute the same.
Ours: the prompts' recipe (the spec's ``train.optimizer``, SGD with momentum 0.9 by default,
lr = base_lr · batch_size / 256, its weight decay on every weight) with the smaller default ``base_lrs``
grid below, searched by ``search.references``; the papers' full fine-tuning numbers use their own lr grid.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from vpt_tune.methods.base import Reference, ReferenceOptions


class FullOptions(ReferenceOptions):
    base_lrs: list[PositiveFloat] = Field([0.001, 0.005, 0.02], min_length=1)


class Full(Reference):
    name = "full"
    summary = "full fine-tuning (reference point): every backbone parameter trains with the head"
    options = FullOptions

    def first_block(self, job, depth: int) -> int:
        return 0

    def install(self, model, job) -> None:
        for param in model.backbone.parameters():
            param.requires_grad_(True)

    def cost_terms(self, job, shape, counts, fresh):
        from vpt_tune.models.backbone import architecture

        return _terms(architecture(job.model, job.img_size))  # on the meta device: no weights

    def model_cost_terms(self, model, job):
        return _terms(model.backbone)


def _terms(vit):
    """Every backbone parameter trains; the forward is the backbone's."""
    from vpt_tune.cost import CostTerms

    return CostTerms(params=sum(p.numel() for p in vit.parameters()))
