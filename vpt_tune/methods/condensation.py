"""Prompt Condensation (Kim et al., "Do We Really Need a Large Number of Visual Prompts?"): after base
training, keep the most important prompts and fine-tune them (the ``condense`` stage; the scores and the
removal are in :mod:`vpt_tune.condense`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from vpt_tune.methods.base import Method, Options, SpaceEntry, StageContext, check_fractions


class CondensationOptions(Options):
    """``epochs``: fine-tuning after condensation (0: evaluated once instead); ``per_block``: keep the top
    fraction of each block instead of globally."""

    epochs: int = Field(1, ge=0)
    per_block: bool = False


class Condensation(Method):
    name = "condensation"
    summary = "Prompt Condensation: keep the most important prompts after training, fine-tune them"
    options = CondensationOptions
    space = {"condensation_ratio": SpaceEntry(float, None, "fraction of the prompts dropped after training")}
    stages = ("condense",)
    after_base = True
    metrics = ("val_acc_uncondensed",)

    def check_space(self, values: dict[str, list]) -> None:
        check_fractions(values, ("condensation_ratio",))

    @staticmethod
    def ratio(params: dict[str, Any]) -> float:
        return float(params.get("condensation_ratio") or 0.0)

    def active(self, params: dict[str, Any]) -> bool:
        return self.ratio(params) > 0

    def stage_epochs(self, stage: str, job) -> int:
        return self.settings(job).epochs

    def expected_counts(self, job, counts: list[int]) -> list[int]:
        """Exact per block; global condensation removes an exact number of prompts, shared out here among
        the blocks in proportion to their prompts (the trained scores decide the real split)."""
        from vpt_tune.condense import removed_count

        ratio = self.ratio(job.params)
        if self.settings(job).per_block:
            return [count - removed_count(count, ratio) for count in counts]
        return _apportion(counts, sum(counts) - removed_count(sum(counts), ratio))

    def run_stage(self, stage: str, context: StageContext) -> None:
        from vpt_tune.condense import condense_, prompt_importance, select_prompts

        model = context.model
        scores = prompt_importance(context.net, model, context.train_split, context.batch_size, context.device)
        condense_(model, select_prompts(scores, self.ratio(context.job.params), self.settings(context.job).per_block))
        context.metrics["val_acc_uncondensed"] = context.metrics["val_acc"]


def _apportion(counts: list[int], total: int) -> list[int]:
    """``total`` shared out in proportion to ``counts`` (largest remainders, ties to the earlier block)."""
    whole = sum(counts)
    shares = [count * total / whole for count in counts]
    result = [int(share) for share in shares]
    by_remainder = sorted(range(len(counts)), key=lambda i: (result[i] - shares[i], i))
    for i in by_remainder[: total - sum(result)]:
        result[i] += 1
    return result
