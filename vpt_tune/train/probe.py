"""Short measurements of a prompted training step on a device: images per second and peak memory.

A plan (:mod:`vpt_tune.search.plan`) turns the throughput into time; packed GPU trials
(``resources.gpus_per_worker: auto``) are sized from the peak memory and from the batch at which the
throughput stops rising. Random weights: the speed of a step does not depend on their values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vpt_tune.models.backbone import create_backbone
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import autocast


@dataclass(frozen=True)
class StepRate:
    """One batch size's measured step on one device."""

    device: str
    batch_size: int
    train_images_per_s: float  # forward + backward + optimiser step
    eval_images_per_s: float  # forward only, no gradients
    peak_memory_bytes: int | None  # CUDA: the most the training step held (None elsewhere)

    def as_dict(self) -> dict:
        return asdict(self)


def _images_per_second(step: Callable[[], None], batch_size: int, device: torch.device, seconds: float) -> float:
    """Run ``step`` once to warm up, then until ``seconds`` have passed (at least twice); images per second."""
    step()
    done, started = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - started < seconds:
        step()
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return done * batch_size / (time.perf_counter() - started)


def measure_step(
    model: str,
    img_size: int,
    counts: Sequence[int],
    classes: int,
    batch_size: int,
    device: torch.device,
    seconds: float = 0.5,
) -> StepRate:
    """Train and evaluation throughput of timm ``model`` (random weights) with ``counts`` prompts per
    block on ``batch_size`` random images, as trials run them (bf16 autocast on CUDA); each timed for
    about ``seconds``. On CUDA also the training step's peak memory."""
    torch.manual_seed(0)
    net = PromptedViT(create_backbone(model, "random", img_size), classes, list(counts)).to(device)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        with autocast(device):
            loss = loss_fn(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def eval_step() -> None:
        with autocast(device):
            net(images)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    net.train()
    train_rate = _images_per_second(train_step, batch_size, device, seconds)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    net.eval()
    eval_rate = _images_per_second(eval_step, batch_size, device, seconds)
    return StepRate(str(device), batch_size, train_rate, eval_rate, peak)


@dataclass(frozen=True)
class MemoryProbe:
    """What packing trials onto one GPU needs to know: its memory, one trial's peak, and the training
    throughput of one process at ``k`` times the trial's batch (``k`` trials sharing the GPU's SMs)."""

    total_bytes: int
    peak_bytes: int
    images_per_s: dict[int, float]  # k -> images per second at batch k * batch_size


def probe_memory(model: str, img_size: int, counts: Sequence[int], classes: int, batch_size: int,
                 max_share: int = 16) -> MemoryProbe:
    """Measure on this process's CUDA device: one trial's peak memory at ``batch_size``, then the throughput
    at batches 2, 4, ... times it while that many trials' peaks fit in memory (at most ``max_share``)."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    first = measure_step(model, img_size, counts, classes, batch_size, device)
    rates, k = {1: first.train_images_per_s}, 2
    while k <= max_share and k * first.peak_memory_bytes < total:
        try:
            rates[k] = measure_step(model, img_size, counts, classes, k * batch_size, device).train_images_per_s
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        k *= 2
    return MemoryProbe(total, first.peak_memory_bytes, rates)


def out_of_memory_message(peak_bytes: int, total_bytes: int, gpus_per_worker: float, batch_size: int) -> str:
    """What a trial that ran out of GPU memory tells the user: what it had, and what to set."""
    gib = 1024**3
    share = f"{gpus_per_worker:g} of a {total_bytes / gib:.0f} GiB GPU"
    if gpus_per_worker >= 1:
        fix = f"lower train.batch_size (now {batch_size}) or use a GPU with more memory"
    else:
        wider = min(1.0, 1 / max(1, math.floor(1 / gpus_per_worker) - 1))
        fix = (f"set resources.gpus_per_worker: {wider:.4g} (fewer trials per GPU) or auto, "
               f"or lower train.batch_size (now {batch_size})")
    return f"the trial ran out of GPU memory ({peak_bytes / gib:.1f} GiB at its peak, sharing {share}); {fix}"
