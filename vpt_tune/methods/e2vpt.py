"""E²VPT (Han et al., ICCV 2023): key/value prompts inside attention, and pruning of the visual prompts.

Key/value prompts: :mod:`vpt_tune.models.kv_prompts`. Pruning (the ``prune`` stage): the token and
segment gates are scored, the model is rewound, the pruned prompts are removed and it retrains
(:mod:`vpt_tune.prune`, which says how the ``authors`` and ``ours`` scorings differ).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from vpt_tune.methods.base import Method, Options, SpaceEntry, StageContext, check_fractions


class E2VPTOptions(Options):
    """``kv_shared``: one tensor per block serves as keys and values (the authors' commands), or separate
    key and value tensors (the paper's description); ``kv_position``: before or after the image keys.
    ``prune_scoring`` (with prune ratios): ``authors`` (trained gates, mean signed gradient, at most 12
    of 16 segments pruned, fresh random rewind, as ChengHan111/E2VPT) or ``ours`` (|gradient| at gate 1,
    rewind to the initial values); ``prune_epochs``: retraining after pruning (null: ``train.epochs``)."""

    kv_shared: bool = True
    kv_position: Literal["prepend", "append"] = "prepend"
    prune_scoring: Literal["authors", "ours"] = "authors"
    prune_epochs: int | None = Field(None, gt=0)


class E2VPT(Method):
    name = "e2vpt"
    summary = "E²VPT: key/value prompts in every block's attention, and token/segment pruning of the prompts"
    main = True
    options = E2VPTOptions
    space = {
        "kv_prompts": SpaceEntry(int, None, "key/value prompts in every block (null: 0)"),
        "token_prune_ratio": SpaceEntry(float, None, "fraction of prompt tokens pruned"),
        "segment_prune_ratio": SpaceEntry(float, None, "fraction of each kept token's 16 segments pruned"),
    }
    stages = ("prune",)
    metrics = ("val_acc_unpruned",)

    def check_space(self, values: dict[str, list]) -> None:
        check_fractions(values, ("token_prune_ratio", "segment_prune_ratio"))

    @staticmethod
    def prune_ratios(job) -> tuple[float, float]:
        """The (token, segment) prune ratios; (0, 0) when the job does not prune."""
        return float(job.params.get("token_prune_ratio") or 0.0), float(job.params.get("segment_prune_ratio") or 0.0)

    def runs_stage(self, stage: str, job) -> bool:
        return any(self.prune_ratios(job))

    def stage_epochs(self, stage: str, job) -> int:
        epochs = self.settings(job).prune_epochs
        return job.epochs if epochs is None else epochs

    def kv_counts(self, job, depth: int) -> list[int]:
        """Key/value prompts per block: ``kv_prompts`` in every block (0: none)."""
        return [int(job.params.get("kv_prompts") or 0)] * depth

    def first_block(self, job, depth: int) -> int:
        return 0 if any(self.kv_counts(job, depth)) else depth

    def gated(self, job) -> bool:
        """Whether the gates train with the prompts before pruning (the authors' scoring)."""
        return self.settings(job).prune_scoring == "authors" and self.runs_stage("prune", job)

    def model_arguments(self, job, depth: int) -> dict[str, Any]:
        options = self.settings(job)
        return {"kv_counts": self.kv_counts(job, depth), "kv_shared": options.kv_shared,
                "kv_position": options.kv_position, "gated": self.gated(job)}

    def expected_counts(self, job, counts: list[int]) -> list[int]:
        from vpt_tune.condense import removed_count

        tokens = self.prune_ratios(job)[0]
        if not tokens:
            return counts
        return [count - removed_count(count, tokens) for count in counts]  # the same token indices in every block

    def cost_terms(self, job, shape, counts, fresh):
        from vpt_tune.cost import kv_attention_terms

        return kv_attention_terms(shape, counts, fresh, self.kv_counts(job, shape.depth), self.settings(job).kv_shared)

    def model_cost_terms(self, model, job):
        from dataclasses import replace

        from vpt_tune.cost import ViTShape, kv_attention_terms
        from vpt_tune.prune import masked_entries

        kv = model.kv_prompts
        terms = kv_attention_terms(ViTShape.of(model.backbone), model.prompts.counts, model.prompts.fresh,
                                   kv.counts, kv.value is None)
        return replace(terms, params=terms.params - masked_entries(model))  # masked segments do not train

    def keeps_initial(self, job) -> bool:
        return self.settings(job).prune_scoring == "ours" and self.runs_stage("prune", job)

    def run_stage(self, stage: str, context: StageContext) -> None:
        """Score the gates, rewind, remove the pruned prompts and fix the segment masks."""
        from vpt_tune.prune import MAX_PRUNED_SEGMENTS, gate_importance, prune_, select_gates

        job, model = context.job, context.model
        scoring = self.settings(job).prune_scoring
        scores = gate_importance(context.net, model, context.train_split, context.batch_size, context.device)
        if scoring == "ours":  # every trained tensor back to its initial value, lottery-ticket style
            model.load_state_dict(context.initial, strict=False)
        else:  # the authors rebuild the model without reseeding: fresh draws (seeded here, so a resume draws the same)
            context.reinitialise(int(hashlib.sha256(f"e2vpt rewind {job.seed}".encode()).hexdigest()[:15], 16))
        cap = MAX_PRUNED_SEGMENTS if scoring == "authors" else None
        prune_(model, *select_gates(scores, *self.prune_ratios(job), cap))
        context.metrics["val_acc_unpruned"] = context.metrics["val_acc"]
