"""Frozen-prefix cache: same logits and same training as the uncached model, only when it applies."""

from __future__ import annotations

import pytest
import torch

from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import TrainConfig, train
from vpt_tune.train.prefix_cache import FromBlock, TokenSplit, cached_prefix

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "counts, kv_counts, start",
    [
        (prompt_counts(3, "last_k", 4, depth=2), None, 2),
        (prompt_counts(3, "layers", 4, layers=[1, 3]), None, 1),
        (prompt_counts(3, "last_k", 4, depth=1), [0, 0, 2, 0], 2),  # KV prompts enter first: block 2
        ([0, 0, 0, 0], None, 4),  # no prompts at all: only the head trains
    ],
)
def test_cached_logits_equal_uncached(make_vit, two_class_splits, counts, kv_counts, start):
    model = PromptedViT(make_vit(), 2, counts, kv_counts=kv_counts).eval()
    assert model.first_prompted_block == start
    split = two_class_splits(10, 0)
    net, (cached,) = cached_prefix(model, [split], 4, CPU)
    assert isinstance(net, FromBlock) and isinstance(cached, TokenSplit) and net.start == start
    with torch.no_grad():
        for (images, labels), (tokens, cached_labels) in zip(split.batches(4), cached.batches(4)):
            assert torch.equal(labels, cached_labels)
            torch.testing.assert_close(net(tokens), model(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("placement", ["shallow", "deep", "first_k"])
def test_no_cache_when_prompts_start_at_block_0(make_vit, two_class_splits, placement):
    model = PromptedViT(make_vit(), 2, prompt_counts(2, placement, 4, depth=2))
    split = two_class_splits(6, 0)
    net, splits = cached_prefix(model, [split], 4, CPU)
    assert net is model and splits[0] is split


def test_frozen_prefix_refuses_prompted_blocks(make_vit, images):
    model = PromptedViT(make_vit(), 2, prompt_counts(2, "last_k", 4, depth=2))
    with pytest.raises(ValueError, match="after the first prompted block"):
        model.frozen_prefix(images, 3)


def test_training_on_cached_prefix_matches_uncached(make_vit, two_class_splits):
    """Same seed, same updates: the cache changes where the frozen forward happens, nothing else."""
    cfg = TrainConfig(epochs=2, batch_size=8, base_lr=2.0, weight_decay=1e-3, warmup_epochs=0.5, seed=3)
    train_split, val_split = two_class_splits(24, 1), two_class_splits(12, 2)
    results = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        model = PromptedViT(make_vit(), 2, prompt_counts(4, "last_k", 4, depth=2))
        net, splits = cached_prefix(model, [train_split, val_split], 8, CPU) if use_cache else (model, [train_split, val_split])
        metrics = train(net, *splits, cfg, CPU)
        results.append((metrics, {k: v.clone() for k, v in model.state_dict().items() if "prompts" in k or "head" in k}))
    (plain, plain_state), (cached, cached_state) = results
    assert cached["val_acc"] == plain["val_acc"]
    assert cached["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    for key, value in plain_state.items():
        torch.testing.assert_close(cached_state[key], value, rtol=1e-4, atol=1e-5)
