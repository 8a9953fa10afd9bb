"""Prompt placement: how many fresh prompts each transformer block gets (pure Python, no torch).

A placement is described by one integer per block: the number of *fresh* prompts inserted before
that block (0 = none). VPT-shallow is ``[T, 0, ..., 0]``, VPT-deep ``[T] * L``. A block with fresh
prompts discards the previous prompt outputs; a block without carries them through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Placement = Literal["shallow", "deep", "first_k", "last_k", "layers"]
PLACEMENTS: tuple[str, ...] = ("shallow", "deep", "first_k", "last_k", "layers")


def prompt_counts(
    num_prompts: int,
    placement: Placement,
    num_blocks: int,
    depth: int | None = None,
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Fresh prompts per block for a placement.

    ``first_k`` / ``last_k`` give fresh prompts to the first / last ``depth`` blocks; ``layers``
    gives them to the listed block indices.
    """
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    if placement == "shallow":
        chosen = [0]
    elif placement == "deep":
        chosen = list(range(num_blocks))
    elif placement in ("first_k", "last_k"):
        if depth is None or not 1 <= depth <= num_blocks:
            raise ValueError(f"placement {placement!r} needs 1 <= depth <= {num_blocks}, got {depth}")
        chosen = list(range(depth)) if placement == "first_k" else list(range(num_blocks - depth, num_blocks))
    elif placement == "layers":
        if not layers or any(not 0 <= i < num_blocks for i in layers):
            raise ValueError(f"placement 'layers' needs block indices in [0, {num_blocks}), got {layers}")
        chosen = sorted(set(layers))
    else:
        raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    return [num_prompts if i in chosen else 0 for i in range(num_blocks)]


def tokens_per_block(counts: Sequence[int], fresh: Sequence[bool] | None = None) -> list[int]:
    """Prompt tokens present in each block's input under VPT's replace-or-carry rule.

    ``fresh[i]``: block i discards the previous prompts and inserts its own ``counts[i]`` (default:
    exactly the blocks with ``counts[i] > 0``; a condensed block may be fresh with 0 prompts).
    """
    fresh = [c > 0 for c in counts] if fresh is None else fresh
    present, carried = [], 0
    for count, new in zip(counts, fresh):
        carried = count if new else carried
        present.append(carried)
    return present
