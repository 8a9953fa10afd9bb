"""Linear probe: a reference point on a front (VPT, Jia et al., ECCV 2022, reports it as "Linear").

No prompts and a frozen backbone: only the new linear head on the class token trains, with the
prompts' recipe (SGD with momentum 0.9 unless the spec's ``train.optimizer`` says otherwise,
lr = base_lr · batch_size / 256). The spec's ``num_prompts`` / ``placement`` still reach its jobs and
are ignored. Its cost is the core's with no prompt: 0 prompt tokens, the plain backbone's GFLOPs plus
the head's, the head's parameters. Ours: the default lr grid, searched by ``search.references``.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from vpt_tune.methods.base import Reference, ReferenceOptions


class LinearOptions(ReferenceOptions):
    base_lrs: list[PositiveFloat] = Field([0.05, 0.2, 1.0], min_length=1)


class Linear(Reference):
    name = "linear"
    summary = "linear probe (reference point): frozen backbone, only the head trains"
    options = LinearOptions
