"""SPT prompt initialisation (Wang et al., ICML 2024): prompts drawn from prototypes of each block's
input tokens over the training images (:mod:`vpt_tune.models.prototype_init`), instead of VPT's uniform draw."""

from __future__ import annotations

from typing import Any

from vpt_tune.methods.base import Method, SpaceEntry

PROMPT_INITS = ("uniform", "spt_random", "spt_mean", "spt_max")


class SPT(Method):
    name = "spt"
    summary = "Self-Prompt Tuning init: prompts from prototypes of the block's input tokens"
    space = {"prompt_init": SpaceEntry(str, "uniform", "uniform (VPT) or SPT prototypes: spt_random | spt_mean | spt_max",
                                        off="uniform")}

    def check_space(self, values: dict[str, list]) -> None:
        inits = values.get("prompt_init", [])
        if any(init not in PROMPT_INITS for init in inits):
            raise ValueError(f"prompt_init values must be among {list(PROMPT_INITS)}, got {inits}")

    def active(self, params: dict[str, Any]) -> bool:
        return params.get("prompt_init", "uniform") != "uniform"

    def initialise(self, model, job, train_images, seed: int) -> None:
        """Prototypes over the training images shuffled with ``seed``."""
        import torch

        from vpt_tune.models.prototype_init import prototype_init_

        generator = torch.Generator().manual_seed(seed)
        images = (x for x, _ in train_images.batches(job.batch_size, generator))
        prototype_init_(model, images, job.params["prompt_init"].removeprefix("spt_"), generator)
