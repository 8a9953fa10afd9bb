"""Frozen-prefix cache: same logits and same training as the uncached model, only when it applies, shared
by later trials on the node only when backbone, data and first prompted block are the same."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vpt_tune.data.vtab import load_split
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import TrainConfig, train
from vpt_tune.train.prefix_cache import PREFIX, FromBlock, TokenSplit, backbone_digest, cached_prefix

from conftest import make_split
from test_data import _write_task

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """Every test gets its own node cache (the prefix store lives there)."""
    monkeypatch.setenv("VPT_TUNE_CACHE", str(tmp_path / "cache"))


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
        splits = [train_split, val_split]
        net, splits = cached_prefix(model, splits, 8, CPU) if use_cache else (model, splits)
        metrics = train(net, *splits, cfg, CPU)
        trained = {k: v.clone() for k, v in model.state_dict().items() if "prompts" in k or "head" in k}
        results.append((metrics, trained))
    (plain, plain_state), (cached, cached_state) = results
    assert cached["val_acc"] == plain["val_acc"]
    assert cached["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    for key, value in plain_state.items():
        torch.testing.assert_close(cached_state[key], value, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the node-local store, shared by trials


@pytest.fixture
def prefix_calls(monkeypatch):
    """A record of the block index of every frozen-prefix batch computed."""
    calls = []
    real = PromptedViT.frozen_prefix

    def counting(self, images, start):
        calls.append(start)
        return real(self, images, start)

    monkeypatch.setattr(PromptedViT, "frozen_prefix", counting)
    return calls


def _entries() -> list:
    return sorted(PREFIX.directory.glob("*.npy"))


def _assert_logits_equal(net, model, split, cached):
    with torch.no_grad():
        for (images, _), (tokens, _) in zip(split.batches(4), cached.batches(4)):
            torch.testing.assert_close(net(tokens), model(images), rtol=0, atol=1e-5)


LATE = prompt_counts(3, "last_k", 4, depth=2)  # first prompted block: 2


def test_second_trial_loads_the_prefix_instead_of_computing_it(make_vit, two_class_splits, prefix_calls):
    train_split, eval_split = two_class_splits(10, 0), two_class_splits(6, 1)
    first = PromptedViT(make_vit(), 2, LATE)
    _, (train1, eval1) = cached_prefix(first, [train_split, eval_split], 4, CPU)
    assert prefix_calls and len(_entries()) == 2
    prefix_calls.clear()
    second = PromptedViT(make_vit(), 2, LATE).eval()  # a new trial: the backbone built again the same way
    net, (train2, eval2) = cached_prefix(second, [two_class_splits(10, 0), two_class_splits(6, 1)], 4, CPU)
    assert prefix_calls == []  # served from the store
    assert isinstance(net, FromBlock) and net.start == 2
    assert torch.equal(train2.tokens, train1.tokens) and torch.equal(eval2.tokens, eval1.tokens)
    assert torch.equal(train2.labels, train_split.labels)
    _assert_logits_equal(net, second, train_split, train2)
    _assert_logits_equal(net, second, eval_split, eval2)


def test_vtab_split_is_keyed_by_its_files(tmp_path, make_vit, prefix_calls):
    task = _write_task(tmp_path)
    model = PromptedViT(make_vit(), 4, LATE).eval()

    def trial():
        prefix_calls.clear()
        split = load_split(task, "train800", 32, (0.5,) * 3, (0.5,) * 3, classes=4)
        assert split.key is not None
        net, (cached,) = cached_prefix(model, [split], 2, CPU)
        _assert_logits_equal(net, model, split, cached)
        return bool(prefix_calls)

    assert trial() and not trial()  # computed once, then loaded
    Image.new("RGB", (10, 7), (0, 0, 0)).save(task / "images" / "red.png")  # changed data: a new key
    assert trial() and not trial()
    assert len(_entries()) == 2


def test_other_backbone_or_data_does_not_reuse(make_vit, two_class_splits, prefix_calls):
    split = two_class_splits(8, 0)
    model = PromptedViT(make_vit(), 2, LATE).eval()
    cached_prefix(model, [split], 4, CPU)
    cases = {
        "other weights": (PromptedViT(make_vit(seed=1), 2, LATE), split),
        "other structure": (PromptedViT(make_vit(num_heads=6), 2, LATE), split),
        "other first block": (PromptedViT(make_vit(), 2, prompt_counts(3, "last_k", 4, depth=1)), split),
        "other images": (model, two_class_splits(8, 1)),
        "other normalisation": (model, make_split(split.images, split.labels, mean=(0.4, 0.5, 0.5))),
    }
    for name, (other, data) in cases.items():
        prefix_calls.clear()
        other.eval()
        net, (cached,) = cached_prefix(other, [data], 4, CPU)
        assert prefix_calls, name
        _assert_logits_equal(net, other, data, cached)
    assert len(_entries()) == 1 + len(cases)


def test_backbone_digest_covers_the_frozen_prefix_only(make_vit):
    model = PromptedViT(make_vit(), 2, LATE)
    before = backbone_digest(model, 2)
    with torch.no_grad():
        model.backbone.blocks[2].mlp.fc1.weight.add_(1.0)  # a block from the first prompted one on: irrelevant
    assert backbone_digest(model, 2) == before
    with torch.no_grad():
        model.backbone.blocks[1].mlp.fc1.weight[0, 0] += 1e-6
    assert backbone_digest(model, 2) != before
    assert backbone_digest(model, 1) != backbone_digest(model, 2)


@pytest.mark.parametrize("damage", [b"", b"garbage", "truncate"])
def test_corrupt_entry_is_recomputed(make_vit, two_class_splits, prefix_calls, damage):
    split = two_class_splits(8, 0)
    cached_prefix(PromptedViT(make_vit(), 2, LATE), [split], 4, CPU)
    (entry,) = _entries()
    content = entry.read_bytes()
    entry.write_bytes(content[: len(content) // 2] if damage == "truncate" else damage)
    prefix_calls.clear()
    model = PromptedViT(make_vit(), 2, LATE).eval()
    net, (cached,) = cached_prefix(model, [split], 4, CPU)
    assert prefix_calls  # recomputed, not fatal
    _assert_logits_equal(net, model, split, cached)
    assert entry.read_bytes() == content  # and stored again


def test_store_off_or_too_small_still_caches_in_memory(make_vit, two_class_splits, prefix_calls, monkeypatch):
    split = two_class_splits(8, 0)
    for limit in ("0", "1e-9"):
        monkeypatch.setenv("VPT_TUNE_PREFIX_CACHE_GB", limit)
        model = PromptedViT(make_vit(), 2, LATE).eval()
        net, (cached,) = cached_prefix(model, [split], 4, CPU)
        assert isinstance(cached, TokenSplit)
        _assert_logits_equal(net, model, split, cached)
    assert _entries() == []
    prefix_calls.clear()
    cached_prefix(model, [split], 4, CPU, store=None)
    assert prefix_calls and _entries() == []


def test_augmented_split_stays_uncached(make_vit, two_class_splits, prefix_calls):
    split = two_class_splits(8, 0)
    split.augmented = True
    model = PromptedViT(make_vit(), 2, LATE)
    net, splits = cached_prefix(model, [split], 4, CPU)
    assert net is model and splits[0] is split and not prefix_calls and _entries() == []
