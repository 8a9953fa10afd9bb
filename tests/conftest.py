"""Shared fixtures: small random timm ViTs, block-level recording hooks, tiny image splits.

Everything is built from random weights at tiny sizes so the unit tests run in seconds on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import timm
import torch

from vpt_tune.data.splits import ImageSplit
from vpt_tune.models.backbone import freeze

@pytest.fixture(autouse=True)
def _progress_on_stdout():
    """In-process searches show their progress on stdout, as under the command line (tests read it there),
    and their records reach the root logger too, where caplog listens before pytest 9.2: set again for
    every test, since a test that runs the CLI in-process lets it stop them there."""
    from vpt_tune.cli import log_to_terminal

    log_to_terminal()
    logging.getLogger("vpt_tune").propagate = True


def require(available: bool, what: str) -> None:
    """Skip a test whose optional system package (``what``: how to install it) is missing here; under CI
    (``CI=true``) fail instead, since .ci/run installs every one: CI skips nothing."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"missing in CI, where .ci/run should have installed it: {what}")
        pytest.skip(f"not installed: {what}")


def assert_front(table) -> None:
    """``table["pareto"]`` marks exactly the finished trials no other finished trial of their task dominates
    (val_acc up, prompt_tokens and gflops down), checked pair by pair; other statuses are never on a front."""
    for _, trials in table.groupby("task"):
        finished = trials[trials["status"] == "finished"]
        assert not trials.loc[trials["status"] != "finished", "pareto"].any()
        for index, row in finished.iterrows():
            others = finished.drop(index)
            at_least = ((others["val_acc"] >= row["val_acc"]) & (others["prompt_tokens"] <= row["prompt_tokens"])
                        & (others["gflops"] <= row["gflops"]))
            better = ((others["val_acc"] > row["val_acc"]) | (others["prompt_tokens"] < row["prompt_tokens"])
                      | (others["gflops"] < row["gflops"]))
            assert bool(row["pareto"]) == (not (at_least & better).any()), row.to_dict()


# A 4-block ViT of width 48 on 32-px images with 8-px patches: 16 patches + 1 class token.
SMALL_VIT = dict(model="vit_tiny_patch16_224", depth=4, embed_dim=48, num_heads=3, patch_size=8, img_size=32)


def _build_vit(
    model: str = "vit_tiny_patch16_224", seed: int = 0, fused_attn: bool | None = None, sharp: bool = True, **kwargs
):
    """A randomly initialised timm ViT (timm keyword arguments override the model's defaults), frozen.

    timm initialises linear weights with std 0.02, which at width 48 leaves attention almost uniform:
    a prompt then moves the class token by ~1e-7. ``sharp`` re-initialises every linear weight of the
    blocks with std 1/sqrt(fan_in) so every token measurably affects every other one.
    """
    torch.manual_seed(seed)
    vit = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    if sharp:
        for module in vit.blocks.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    if fused_attn is not None:
        for blk in vit.blocks:
            blk.attn.fused_attn = fused_attn
    return freeze(vit)


@pytest.fixture
def make_vit() -> Callable[..., torch.nn.Module]:
    """Factory: ``make_vit(**overrides)`` builds the small random ViT, overrides applied."""

    def make(**overrides):
        return _build_vit(**{**SMALL_VIT, **overrides})

    return make


@pytest.fixture
def small_vit(make_vit):
    return make_vit()


@pytest.fixture
def images() -> torch.Tensor:
    """Two normalised-looking 32-px images matching ``small_vit``."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@dataclass
class BlockRecord:
    """Inputs and outputs of every block of one forward pass."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def lengths(self) -> list[int]:
        return [self.inputs[i].shape[1] for i in sorted(self.inputs)]


@pytest.fixture
def record_blocks() -> Callable[[torch.nn.Module], Iterator[BlockRecord]]:
    """Context manager: ``with record_blocks(vit) as rec:`` captures each block's input and output."""

    @contextmanager
    def record(vit) -> Iterator[BlockRecord]:
        rec = BlockRecord()
        handles = []
        for i, blk in enumerate(vit.blocks):
            handles.append(blk.register_forward_pre_hook(
                lambda _m, args, i=i: rec.inputs.__setitem__(i, args[0].detach().clone())))
            handles.append(blk.register_forward_hook(
                lambda _m, _args, out, i=i: rec.outputs.__setitem__(i, out.detach().clone())))
        try:
            yield rec
        finally:
            for handle in handles:
                handle.remove()

    return record


def make_split(images: torch.Tensor, labels: torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> ImageSplit:
    return ImageSplit(
        images=images, labels=labels,
        mean=torch.tensor(mean).view(1, 3, 1, 1), std=torch.tensor(std).view(1, 3, 1, 1),
    )


@pytest.fixture
def two_class_splits() -> Callable[[int, int], ImageSplit]:
    """Factory ``(n, seed) -> ImageSplit``: dark images are class 0, bright ones class 1 (noisy, 32 px)."""

    def build(n: int, seed: int) -> ImageSplit:
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 2
        level = torch.where(labels[:, None, None, None] == 1, 190.0, 60.0)
        noisy = level + 25.0 * torch.randn(n, 3, 32, 32, generator=gen)
        return make_split(noisy.clamp(0, 255).to(torch.uint8), labels)

    return build
