"""SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022; reference code dongzelian/SSF).

A reference point on a front: a per-channel scale and shift after every linear op and LayerNorm of
the frozen backbone (:mod:`vpt_tune.models.ssf`); they and the head train, no prompt joins the sequence
(the spec's ``num_prompts`` / ``placement`` reach its jobs and are ignored). The patch embedding changes
too, so no frozen prefix is cached. Costs: 0 prompt tokens; the SSF scalars (2 per scaled channel) and
the head train; GFLOPs are the plain backbone's, since every pair merges into the weights it follows
after training (:func:`~vpt_tune.models.ssf.merge_ssf_`).

Ours: the authors train with AdamW on their own lr grid; here SSF trains like the prompts (the spec's
``train.optimizer``, SGD with momentum 0.9 by default, lr = base_lr · batch_size / 256) on the default
``base_lrs`` grid below, searched by ``search.references``.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from vpt_tune.methods.base import Reference, ReferenceOptions


class SSFOptions(ReferenceOptions):
    base_lrs: list[PositiveFloat] = Field([0.02, 0.1, 0.5], min_length=1)


class SSF(Reference):
    name = "ssf"
    summary = "SSF (reference point): a trained scale and shift per channel after every linear op and norm"
    options = SSFOptions

    def first_block(self, job, depth: int) -> int:
        return 0

    def install(self, model, job) -> None:
        from vpt_tune.models.ssf import add_ssf

        add_ssf(model.backbone)  # trainable pairs inside the frozen backbone: trainable_state keeps them

    def cost_terms(self, job, shape, counts, fresh):
        from vpt_tune.models.backbone import architecture

        return _terms(architecture(job.model, job.img_size))

    def model_cost_terms(self, model, job):
        return _terms(model.backbone)


def _terms(vit):
    """The SSF scalars train; no extra multiply-adds once merged."""
    from vpt_tune.cost import CostTerms
    from vpt_tune.models.ssf import ssf_parameter_count

    return CostTerms(params=ssf_parameter_count(vit))
