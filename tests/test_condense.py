"""Prompt Condensation: Taylor scores, global/per-block selection, a condensed model that really drops prompts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vpt_tune.condense import condense_, prompt_importance, select_prompts
from vpt_tune.cost import ViTShape, prompted_cost
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT

CPU = torch.device("cpu")


def _deep(make_vit, prompts=3, seed=0):
    torch.manual_seed(seed)
    return PromptedViT(make_vit(), 2, prompt_counts(prompts, "deep", 4)).eval()


def test_select_global_and_per_block():
    scores = {0: torch.tensor([5.0, 1.0, 0.0]), 1: torch.tensor([4.0, 3.0, 2.0]), 2: torch.tensor([0.5, 0.1, 9.0])}
    kept = select_prompts(scores, ratio=0.5)  # keep ceil(0.5 * 9) = 5 best overall
    assert kept == {0: [0], 1: [0, 1, 2], 2: [2]}
    assert sum(map(len, kept.values())) == 5
    assert select_prompts(scores, ratio=0.5, per_block=True) == {0: [0, 1], 1: [0, 1], 2: [0, 2]}
    assert select_prompts(scores, ratio=0.0) == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
    with pytest.raises(ValueError, match="ratio"):
        select_prompts(scores, ratio=1.0)


def test_the_prompt_that_carries_the_signal_is_kept(make_vit, two_class_splits):
    model = _deep(make_vit)
    with torch.no_grad():
        for tokens in model.prompts.tokens.values():
            tokens.zero_()  # removing a zero prompt changes nothing to first order...
        model.prompts.tokens["1"][2].normal_()  # ...only this one matters
    scores = prompt_importance(model, model, two_class_splits(16, 0), 8, CPU)
    assert scores[1][2] > 0
    assert all(s.sum() == 0 for block, s in scores.items() if block != 1)
    assert scores[1][:2].sum() == 0
    total = sum(len(s) for s in scores.values())
    kept = select_prompts(scores, ratio=0.9)  # keep ceil(0.1 * 12) = 2
    assert sum(map(len, kept.values())) == math.ceil(0.1 * total)
    assert 2 in kept[1]


def test_condensed_logits_equal_full_model_without_dropped_prompts(make_vit, images):
    model = _deep(make_vit, prompts=3)
    full = {i: p.detach().clone() for i, p in model.prompts.tokens.items()}
    kept = {0: [0, 2], 1: [], 2: [1], 3: [0, 1, 2]}  # block 1 keeps none: it must drop, not carry

    # Reference: the VPT-deep forward written out, with each block's kept prompts only.
    vit, prefix = model.backbone, model.backbone.num_prefix_tokens
    with torch.no_grad():
        x, carried = model.embed(images), 0
        for i, block in enumerate(vit.blocks):
            prompts = full[str(i)][kept[i]].expand(len(images), -1, -1)
            x = torch.cat([x[:, :prefix], prompts, x[:, prefix + carried:]], dim=1)
            carried = len(kept[i])
            x = block(x)
        expected = model.head(vit.norm(x)[:, 0])
        condense_(model, kept)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)
    assert model.prompts.counts == [2, 0, 1, 3] and model.prompts.fresh == [True] * 4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 6 * vit.embed_dim + (vit.embed_dim + 1) * 2


def test_condensed_cost_counts_the_kept_tokens(make_vit):
    model = _deep(make_vit, prompts=4)
    condense_(model, {0: [0], 1: [], 2: [1, 2], 3: [3]})
    shape = ViTShape.of(model.backbone)
    full = prompted_cost(shape, prompt_counts(4, "deep", 4))
    condensed = prompted_cost(shape, model.prompts.counts, fresh=model.prompts.fresh)
    assert condensed.prompt_tokens == pytest.approx((1 + 0 + 2 + 1) / 4)
    assert condensed.gflops < full.gflops
    # Without the fresh flags the empty block would wrongly carry block 0's prompt.
    assert prompted_cost(shape, model.prompts.counts).prompt_tokens == pytest.approx((1 + 1 + 2 + 1) / 4)


def test_job_condenses_then_fine_tunes_and_reports_the_condensed_cost(tmp_path):
    from vpt_tune.data.demo import materialise
    from vpt_tune.train.job import Job, build, expected_cost, run
    from vpt_tune.train.loop import evaluate

    job = Job(
        model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=str(materialise("digits", tmp_path)),
        params={"num_prompts": 4, "placement": "deep", "base_lr": 0.1, "condensation_ratio": 0.75},
        epochs=1, batch_size=100, options={"condensation": {"epochs": 1}},
    )
    epochs = []
    model, metrics = run(job, CPU, on_epoch=lambda epoch, m, _: epochs.append(epoch))
    assert epochs == [0, 1] and job.total_epochs == 2  # training, then condensation fine-tuning
    _, _, val = build(job)  # the reported accuracy is the condensed model's (one flip allowed: cached prefix)
    assert metrics["val_acc"] == pytest.approx(evaluate(model, val, 100, CPU), abs=1.5 / len(val))
    assert metrics["val_acc_uncondensed"] * len(val) == pytest.approx(round(metrics["val_acc_uncondensed"] * len(val)))
    assert sum(model.prompts.counts) == math.ceil(0.25 * 4 * 12)
    assert metrics["prompt_tokens"] == pytest.approx(sum(model.prompts.counts) / 12)
    expected = expected_cost(job)  # known before training: global condensation keeps exactly ceil(0.25 * 48)
    assert metrics["prompt_tokens"] == pytest.approx(expected.prompt_tokens)
    uncondensed = expected_cost(dataclasses.replace(job, params={**job.params, "condensation_ratio": 0.0}))
    assert metrics["gflops"] < uncondensed.gflops and expected.gflops < uncondensed.gflops


def test_ratios_count_exactly_and_condensing_keeps_the_dtype(make_vit, images):
    """0.7 of 10 prompts removes 7 (float rounding must not keep a 4th); a float64 model stays float64."""
    assert select_prompts({0: torch.arange(10.0)}, 0.7) == {0: [7, 8, 9]}
    assert select_prompts({0: torch.arange(10.0)}, 0.7, per_block=True) == {0: [7, 8, 9]}
    torch.manual_seed(0)
    model = PromptedViT(make_vit(), 2, prompt_counts(4, "deep", 4)).double().eval()
    full = {i: t.detach().clone() for i, t in model.prompts.tokens.items()}
    condense_(model, {b: [0, 3] for b in range(4)})
    assert all(t.dtype == torch.float64 and torch.equal(t, full[i][[0, 3]]) for i, t in model.prompts.tokens.items())
    assert model(images.double()).dtype == torch.float64
