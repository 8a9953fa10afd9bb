"""Plain-torch training loop: schedule, optimiser groups, learning, determinism, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_split
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import DivergenceError, TrainConfig, evaluate, make_optimizer, train, warmup_cosine

CPU = torch.device("cpu")
METRIC_KEYS = {"train_loss", "val_acc", "lr", "epoch_seconds"}


@pytest.fixture
def make_model(make_vit):
    def build(counts=None, dropout=0.1, classes=2, seed=0):
        vit = make_vit(depth=2)
        torch.manual_seed(seed)
        return PromptedViT(vit, classes, counts or prompt_counts(4, "deep", 2), prompt_dropout=dropout)

    return build


# ---------------------------------------------------------------- schedule


def test_warmup_cosine_shape():
    total, warmup = 100, 10
    values = [warmup_cosine(step, total, warmup) for step in range(total + 1)]
    rising, decaying = values[:warmup + 1], values[warmup:]
    assert all(a < b for a, b in zip(rising, rising[1:]))  # linear warmup rises
    assert all(0 < v < 1 for v in values[:warmup])
    assert rising[1] - rising[0] == pytest.approx(rising[5] - rising[4])  # linearly
    assert values[warmup] == pytest.approx(1.0)  # peak right after warmup
    assert all(a >= b for a, b in zip(decaying, decaying[1:]))  # then never rises again
    assert values[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=0.02)  # cosine: half-way = 0.5
    assert values[total - 1] < 0.01 and values[total] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total + 50, total, warmup) == pytest.approx(0.0, abs=1e-12)  # stays at 0


def test_warmup_cosine_without_warmup_starts_at_peak():
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)
    assert warmup_cosine(5, 10, 0) == pytest.approx(0.5)


# ---------------------------------------------------------------- optimiser


@pytest.mark.parametrize("optimizer, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_make_optimizer_groups_and_lr(make_model, optimizer, cls):
    model = make_model()
    cfg = TrainConfig(epochs=1, batch_size=64, base_lr=2.0, weight_decay=0.01, optimizer=optimizer)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, cls)
    assert all(group["lr"] == pytest.approx(2.0 * 64 / 256) for group in opt.param_groups)
    decayed = [g for g in opt.param_groups if g["weight_decay"] == 0.01]
    undecayed = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert len(decayed) == 1 and len(undecayed) == 1
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(undecayed[0]["params"]) == {id(model.head.bias)}
    assert ids(decayed[0]["params"]) == ids([model.head.weight, *model.prompts.tokens.values()])
    # every trainable parameter exactly once, no frozen backbone parameter
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len(ids(all_params))
    assert ids(all_params) == ids(p for p in model.parameters() if p.requires_grad)
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9  # VPT's SGD momentum


def test_make_optimizer_rejects_unknown(make_model):
    with pytest.raises(ValueError, match="lamb"):
        make_optimizer(make_model(), TrainConfig(epochs=1, batch_size=8, base_lr=1, weight_decay=0, optimizer="lamb"))


# ---------------------------------------------------------------- training


def _cfg(**kwargs) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=3, batch_size=16, base_lr=1.0, weight_decay=1e-3, warmup_epochs=1, seed=7),
                          **kwargs})


def test_train_learns_and_reports_every_epoch(make_model, two_class_splits):
    train_split, val_split = two_class_splits(64, 1), two_class_splits(32, 2)
    model = make_model()
    prompts_before = {k: v.detach().clone() for k, v in model.prompts.tokens.items()}
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    calls = []
    cfg = _cfg()
    result = train(model, train_split, val_split, cfg, CPU, on_epoch=lambda e, m: calls.append((e, dict(m))))
    assert [e for e, _ in calls] == list(range(cfg.epochs))
    assert all(set(m) == METRIC_KEYS for _, m in calls)
    assert result == calls[-1][1]
    losses = [m["train_loss"] for _, m in calls]
    assert losses[-1] < losses[0]
    assert losses[-1] < math.log(2)  # better than a chance-level classifier
    assert result["val_acc"] >= 0.9
    assert evaluate(model, val_split, 8, CPU) == result["val_acc"]
    assert all(m["epoch_seconds"] > 0 for _, m in calls)
    # lr: the peak (base_lr * batch / 256) is never exceeded and the cosine ends near 0
    peak = cfg.base_lr * cfg.batch_size / 256
    assert all(0 <= m["lr"] <= peak + 1e-12 for _, m in calls)
    assert calls[-1][1]["lr"] < 0.05 * peak
    # prompts moved, the backbone did not
    assert any(not torch.equal(prompts_before[k], v) for k, v in model.prompts.tokens.items())
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())


def test_a_run_that_evaluates_once_evaluates_after_its_last_epoch_only(make_model, two_class_splits):
    train_split, val_split = two_class_splits(64, 1), two_class_splits(32, 2)
    calls = []
    result = train(make_model(), train_split, val_split, _cfg(evaluate_every_epoch=False), CPU,
                   on_epoch=lambda e, m: calls.append(dict(m)))
    assert ["val_acc" in m for m in calls] == [False, False, True]
    every = train(make_model(), train_split, val_split, _cfg(), CPU)
    assert result == {**every, "epoch_seconds": result["epoch_seconds"]}  # the same training, the same accuracy


def test_train_is_deterministic_given_the_seed(make_model, two_class_splits):
    train_split, val_split = two_class_splits(48, 3), two_class_splits(16, 4)
    runs = []
    for run, seed in enumerate((7, 7, 8)):
        model = make_model(dropout=0.3)  # prompt dropout and shuffling both draw random numbers
        torch.manual_seed(1000 + run)  # a different global RNG state before each run: train must reseed
        log = []
        train(model, train_split, val_split, _cfg(epochs=2, seed=seed, base_lr=0.3), CPU,
              on_epoch=lambda e, m: log.append((m["train_loss"], m["val_acc"], m["lr"])))
        runs.append((log, torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])  # the seed matters


class _Recorder(nn.Module):
    """A tiny trainable model recording which examples it sees (image i holds the constant i/255)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen: list[int] = []

    def forward(self, images):
        if self.training:
            self.seen.extend((images[:, 0, 0, 0] * 255).round().long().tolist())
        return self.linear(images.mean(dim=(2, 3)))


def _index_split(n: int):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    return make_split(images, torch.arange(n) % 2, mean=(0, 0, 0), std=(1, 1, 1))


def test_shard_trains_on_every_world_size_th_example():
    split = _index_split(21)
    model = _Recorder()
    train(model, split, split, _cfg(epochs=2, batch_size=4, base_lr=0.1), CPU, shard=(1, 3))
    assert sorted(model.seen) == sorted(list(range(1, 21, 3)) * 2)
    assert model.seen[:7] != list(range(1, 21, 3))  # shuffled


def test_nan_head_raises_divergence_error(make_model, two_class_splits):
    model = make_model()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    epochs = []
    with pytest.raises(DivergenceError, match="base_lr"):
        train(model, two_class_splits(32, 1), two_class_splits(8, 2), _cfg(), CPU,
              on_epoch=lambda e, m: epochs.append(e))
    assert epochs == []  # raised inside the first epoch, before any report


def test_huge_learning_rate_raises_divergence_error(make_model, two_class_splits):
    with pytest.raises(DivergenceError):
        train(make_model(), two_class_splits(32, 1), two_class_splits(8, 2), _cfg(base_lr=1e30, warmup_epochs=0),
              CPU)
