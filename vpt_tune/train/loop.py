"""Plain-torch training and evaluation of one prompted model on one task (no Ray in here).

Recipe from VPT: SGD with momentum 0.9 (AdamW selectable), lr = base_lr · batch_size / 256,
linear warmup then cosine decay, no weight decay on the head bias. Unlike the authors' per-epoch
schedule (whose epoch 0 runs at lr 0), the schedule is stepped per iteration, which matters for the
short schedules of a search. bf16 autocast on GPU, fp32 on CPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vpt_tune.data.splits import ImageSplit
from vpt_tune.errors import DivergenceError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    epochs: int
    batch_size: int
    base_lr: float
    weight_decay: float
    warmup_epochs: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    seed: int = 0
    evaluate_every_epoch: bool = True  # False: only after the last epoch (a final retrain tests once)


@dataclass
class LoopState:
    """Where a :func:`train` run stands after its last finished epoch: enough to continue it exactly.

    ``train`` updates the object it is given after every epoch (before ``on_epoch`` runs), and a run
    given a state with ``epoch > 0`` continues from it: same optimiser moments, schedule position,
    data order and random stream as if it had never stopped.
    """

    epoch: int = 0  # epochs finished
    optimizer: dict | None = None
    schedule: dict | None = None
    shuffle: torch.Tensor | None = None  # the data-order generator's state
    torch_rng: torch.Tensor | None = None  # torch's global CPU generator (prompt dropout, augmentation)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "optimizer": self.optimizer, "schedule": self.schedule,
                "shuffle": self.shuffle, "torch_rng": self.torch_rng}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimiser over the trainable parameters; biases get no weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith("bias")], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if n.endswith("bias")], "weight_decay": 0.0},
    ]
    lr = cfg.base_lr * cfg.batch_size / 256
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (off elsewhere): how trials train and evaluate."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, split: ImageSplit, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    model.eval()
    correct = 0
    for images, labels in split.batches(batch_size):
        with autocast(device):
            logits = model(images.to(device))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
    return correct / len(split)


def train(
    model: nn.Module,
    train_split: ImageSplit,
    val_split: ImageSplit,
    cfg: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None,
    shard: tuple[int, int] = (0, 1),
    state: LoopState | None = None,
) -> dict[str, float]:
    """Train the trainable parameters of ``model``; evaluate on ``val_split`` after every epoch (after the
    last only, without ``cfg.evaluate_every_epoch``).

    ``on_epoch(epoch, metrics)`` receives ``train_loss``, ``val_acc`` (when evaluated), ``lr`` and
    ``epoch_seconds``.
    ``shard=(rank, world_size)`` trains this process on every world_size-th training example
    (data-parallel workers). ``state`` (a :class:`LoopState`) is continued from when it has finished
    epochs and brought up to date after each epoch. Returns the last epoch's metrics (of this call;
    empty when ``state`` was already complete). Raises :class:`DivergenceError` when the loss stops
    being finite.
    """
    state = LoopState() if state is None else state
    seed_everything(cfg.seed)
    rank, world = shard
    indices = torch.arange(rank, len(train_split), world)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(indices) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)),
    )
    shuffle = torch.Generator().manual_seed(cfg.seed)
    if state.epoch > 0:
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.schedule)
        shuffle.set_state(state.shuffle)
        torch.set_rng_state(state.torch_rng)
    loss_fn = nn.CrossEntropyLoss()
    metrics: dict[str, float] = {}
    for epoch in range(state.epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        total_loss, seen = 0.0, 0
        for images, labels in train_split.batches(cfg.batch_size, shuffle, indices):
            images, labels = images.to(device), labels.to(device)
            with autocast(device):
                loss = loss_fn(model(images).float(), labels)
            if not torch.isfinite(loss):
                raise DivergenceError(f"loss became {loss.item()} at epoch {epoch}; lower base_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
        metrics = {"train_loss": total_loss / seen}
        if cfg.evaluate_every_epoch or epoch + 1 == cfg.epochs:
            metrics["val_acc"] = evaluate(model, val_split, cfg.batch_size, device)
        metrics.update(lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.perf_counter() - started)
        state.epoch, state.optimizer, state.schedule = epoch + 1, optimizer.state_dict(), schedule.state_dict()
        state.shuffle, state.torch_rng = shuffle.get_state(), torch.get_rng_state()
        on_epoch(epoch, metrics)
    return metrics
