"""VFPT (Zeng et al., "Visual Fourier Prompt Tuning", NeurIPS 2024; reference code runtsang/VFPT).

VPT prompts, of which the first ``floor(T · fourier_fraction)`` of each prompted block's T prompts join
the sequence as the real part of their unnormalised 2-D FFT, over (those prompts, D) (``dims: all``, the
authors' default), over D only (``hidden``) or over those prompts only (``sequence``). The parameters
stay the raw prompts; the transform is part of the forward, after prompt dropout, as in the authors' code.
Where the Fourier prompts sit among the prompts cannot change the output (prompts carry no position
embedding), so they come first. Fraction 0 is VPT exactly. A block whose ``T · fraction`` is below 1
gets no Fourier prompt (the authors' code fails there on an empty FFT; ours: that block is VPT's).
The FFT of a (T_f, D) tensor per block is left out of ``gflops`` (O(T_f·D·log) against the blocks' N·D²).

With condensation (ours: the paper does not condense), the prompts are scored and removed as VPT's are;
the kept Fourier prompts stay Fourier prompts and are transformed together.
"""

from __future__ import annotations

import math
from typing import Literal

from vpt_tune.methods.base import Method, Options, SpaceEntry


class VFPTOptions(Options):
    """``dims``: the FFT over the Fourier prompts and their channels (``all``), the channels (``hidden``)
    or the prompts (``sequence``): the authors' FOURIER_DIMENSION."""

    dims: Literal["all", "hidden", "sequence"] = "all"


class VFPT(Method):
    name = "vfpt"
    summary = "Visual Fourier Prompt Tuning: a fraction of each block's prompts enters as their 2-D FFT (real part)"
    main = True
    options = VFPTOptions
    space = {"fourier_fraction": SpaceEntry(float, None, "fraction of each block's prompts that are Fourier prompts "
                                                         "(null: 0.5, the authors' default)")}
    DEFAULT_FRACTION = 0.5

    def check_space(self, values: dict[str, list]) -> None:
        given = values.get("fourier_fraction", [])
        if any(not 0 <= v <= 1 for v in given):
            raise ValueError(f"fourier_fraction must lie in [0, 1], got {given}")

    def install(self, model, job) -> None:
        fraction = job.params.get("fourier_fraction")
        fraction = self.DEFAULT_FRACTION if fraction is None else float(fraction)
        counts = [math.floor(count * fraction + 1e-9) if fresh else 0  # (0.3 * 10 = 2.9999999999999996)
                  for count, fresh in zip(model.prompts.counts, model.prompts.fresh)]
        from vpt_tune.models.fourier_prompts import FourierPrompts

        model.prompt_transforms["vfpt"] = FourierPrompts(counts, self.settings(job).dims)
