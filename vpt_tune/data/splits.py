"""What every data layout produces: decoded splits that yield normalised batches, and the error for
data that is missing or malformed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vpt_tune.errors import UserError


class DataError(UserError, ValueError):
    """A dataset that is missing or malformed; the message names the file and the problem."""


class Batched:
    """Batches of ``(inputs, labels)`` over a split that has ``labels`` and ``inputs(indices)``."""

    labels: torch.Tensor
    augmented: bool = False  # batches differ between epochs: inputs cannot be cached

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, indices: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in order, or shuffled when a ``generator`` is given; restricted to ``indices``."""
        order = torch.arange(len(self)) if indices is None else indices
        if generator is not None:
            order = order[torch.randperm(len(order), generator=generator)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.inputs(idx), self.labels[idx]


@dataclass
class ImageSplit(Batched):
    """One decoded split: uint8 images (N, 3, S, S), int64 labels (N,), normalisation constants, and
    ``key``, the images' cache key (:func:`decoded_key`) when known: caches derived from the images use it."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    key: str | None = None

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, S, S)."""
        return (self.images[indices].float() / 255.0 - self.mean) / self.std
