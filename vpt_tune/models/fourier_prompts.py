"""VFPT's Fourier prompts: the first prompts of each block enter the sequence as the real part of their FFT.

A prompt transform of :attr:`~vpt_tune.models.prompted_vit.PromptedViT.prompt_transforms` (see
:mod:`vpt_tune.methods.vfpt` for the method and its options).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def fourier_transform(prompts: torch.Tensor, dims: str = "all") -> torch.Tensor:
    """The real part of the unnormalised FFT of ``prompts`` (B, T_f, D): over both axes (``all``), the
    channels (``hidden``) or the prompts (``sequence``); same shape."""
    if dims == "all":
        return torch.fft.fft(torch.fft.fft(prompts, dim=-1), dim=-2).real
    if dims in ("hidden", "sequence"):
        return torch.fft.fft(prompts, dim=-1 if dims == "hidden" else -2).real
    raise ValueError(f"Fourier dims must be 'all', 'hidden' or 'sequence', got {dims!r}")


class FourierPrompts(nn.Module):
    """Transforms the first ``counts[block]`` of a block's prompts (B, T, D) with :func:`fourier_transform`.

    ``counts`` is a buffer, so it is saved and loaded with the prompts (a condensed model keeps fewer);
    :meth:`keep_` follows the prompts a condensation or pruning keeps.
    """

    def __init__(self, counts: Sequence[int], dims: str = "all"):
        super().__init__()
        fourier_transform(torch.zeros(1, 1, 1), dims)  # refuses unknown dims now, not at the first forward
        self.dims = dims
        self.register_buffer("counts", torch.tensor(list(counts), dtype=torch.long))
        self._counts = [int(c) for c in counts]  # read at every forward: no device sync
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())

    def _sync(self) -> None:
        self._counts = self.counts.tolist()

    def forward(self, block: int, prompts: torch.Tensor) -> torch.Tensor:
        n = self._counts[block]
        if n == 0:
            return prompts
        return torch.cat([fourier_transform(prompts[:, :n], self.dims), prompts[:, n:]], dim=1)

    @torch.no_grad()
    def keep_(self, kept: dict[int, list[int]]) -> None:
        """Only the prompts ``kept`` (sorted indices per block) stay: so do the Fourier ones among them, first."""
        for block, indices in kept.items():
            self.counts[block] = sum(1 for i in indices if i < self._counts[block])
        self._sync()
