"""The method plugin interface: what one prompt-tuning method, or an add-on to one, tells the core.

A method names its fixed options (a pydantic model: the spec section under its name), the entries it
adds to the spec's search ``space``, how it installs into a :class:`~vpt_tune.models.prompted_vit.PromptedViT`
at build time, an optional initialisation, its cost terms and its named stages after base training.
The core (spec, job, cost, plan) only calls these hooks; :mod:`vpt_tune.methods` lists the methods.

Importing a method must not import torch: the spec (so every CLI call, ~0.2 s) reads the options and
space entries of every method, and torch with timm costs ~4 s. Hooks that build or train import
their model code when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

if TYPE_CHECKING:
    import torch

    from vpt_tune.cost import CostTerms, ViTShape
    from vpt_tune.data.splits import Batched
    from vpt_tune.models.prompted_vit import PromptedViT
    from vpt_tune.train.job import Job


class Options(BaseModel):
    """A method's fixed settings (the spec section named after it); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SpaceEntry:
    """An entry a method adds to the spec's ``space``: searched (a Param) or fixed of type ``kind``; ``off``
    is the value that leaves the method out (the entry may be given so, or null, with any method)."""

    kind: type
    default: Any = None
    doc: str = ""
    off: Any = 0


@dataclass
class StageContext:
    """What a stage after base training works on.

    ``net`` runs batches (the model or its prefix-cached wrapper); ``train_split`` is what ``net`` takes,
    ``train_images`` the decoded images; ``metrics`` the latest metrics (a stage may add some);
    ``initial`` the trainable state before training when a method asked for it (:meth:`Method.keeps_initial`);
    ``reinitialise(seed)`` draws the prompts and head afresh as a new model would (initialisation included).
    """

    net: Any
    model: PromptedViT
    job: Job
    train_split: Any
    train_images: Batched
    batch_size: int
    device: torch.device
    metrics: dict[str, float]
    initial: dict | None
    reinitialise: Callable[[int], None] = field(repr=False, default=lambda seed: None)


class Method:
    """One method (``main``: chosen by the spec's ``method:``) or an add-on (used with any main method whose
    prompts join the sequence, when its space entries ask for it). Subclasses override what they need."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for the README and --help
    main: ClassVar[bool] = False
    reference: ClassVar[bool] = False  # a reference point: no prompts, run by ``search.references`` on its own lr grid
    sequence_prompts: ClassVar[bool] = True  # main methods: its prompts join the sequence (add-ons work on those)
    options: ClassVar[type[Options] | None] = None
    space: ClassVar[dict[str, SpaceEntry]] = {}
    stages: ClassVar[tuple[str, ...]] = ()  # named stages after base training, in the order they run
    after_base: ClassVar[bool] = False  # acts only after base training: trials differing in it share a base model
    metrics: ClassVar[tuple[str, ...]] = ()  # metrics it adds to a trial's results

    def check_space(self, space: dict[str, Any]) -> None:
        """Raise ValueError (naming the entry) for values of its space entries it cannot use."""

    def used(self, job: Job) -> bool:
        """Whether ``job`` uses this method: a main method when chosen, an add-on when :meth:`active`."""
        return job.method == self.name if self.main or self.reference else self.active(job.params)

    def active(self, params: dict[str, Any]) -> bool:
        """Add-ons: whether these trial values ask for it."""
        return False

    def settings(self, job: Job) -> Options | None:
        """The job's options of this method, validated (defaults when the spec gave none)."""
        return None if self.options is None else self.options.model_validate(job.options.get(self.name, {}))

    def model_arguments(self, job: Job, depth: int) -> dict[str, Any]:
        """Keyword arguments of :class:`~vpt_tune.models.prompted_vit.PromptedViT` it sets (a model of ``depth`` blocks)."""
        return {}

    def first_block(self, job: Job, depth: int) -> int:
        """The first block it changes, beyond the visual prompts (``depth``: none): blocks before the first
        one any method changes are a frozen prefix, computed once per image (:mod:`vpt_tune.train.prefix_cache`)."""
        return depth

    def install(self, model: PromptedViT, job: Job) -> None:
        """Add what the method needs to a freshly built model (prompts in attention, gates...)."""

    def initialise(self, model: PromptedViT, job: Job, train_images: Batched, seed: int) -> None:
        """Initialise the model's prompts from data (after :meth:`install`, and again at a rewind)."""

    def expected_counts(self, job: Job, counts: list[int]) -> list[int]:
        """The fresh prompts per block after this method's stages, known before training."""
        return counts

    def cost_terms(self, job: Job, shape: ViTShape, counts: list[int], fresh: list[bool]) -> CostTerms | None:
        """Its cost beyond the visual prompts in the sequence, known before training."""
        return None

    def model_cost_terms(self, model: PromptedViT, job: Job) -> CostTerms | None:
        """Its cost in a built (possibly pruned or condensed) model."""
        return None

    def runs_stage(self, stage: str, job: Job) -> bool:
        """Whether ``stage`` runs in ``job`` (which uses this method)."""
        return True

    def stage_epochs(self, stage: str, job: Job) -> int:
        """Training epochs of ``stage`` after its own step (0: evaluated once instead)."""
        return 0

    def keeps_initial(self, job: Job) -> bool:
        """Whether a stage needs the trainable state from before training (:attr:`StageContext.initial`)."""
        return False

    def run_stage(self, stage: str, context: StageContext) -> None:
        """The step of ``stage`` before its training (score, prune, condense...)."""
        raise NotImplementedError(f"{self.name} has no stage {stage!r}")


class ReferenceOptions(Options):
    """``base_lrs``: the base learning rates a reference point trains with, one trial each; each reference
    method sets its own default grid (ours)."""

    base_lrs: list[PositiveFloat] = Field(min_length=1)


class Reference(Method):
    """A reference point on a front (linear probe, SSF, full fine-tuning): no prompt joins the sequence (the
    spec's prompt entries reach its jobs and are ignored), trained per task on its own lr grid."""

    reference = True
    options: ClassVar[type[ReferenceOptions]]

    def model_arguments(self, job: Job, depth: int) -> dict[str, Any]:
        return {"counts": [0] * depth}


def check_fractions(values: dict[str, list], names: tuple[str, ...]) -> None:
    """A fraction of prompts removed must lie in [0, 1): at least one prompt stays."""
    for name in names:
        given = values.get(name, [])
        if any(not 0 <= v < 1 for v in given):
            raise ValueError(f"{name} must lie in [0, 1) (the fraction removed), got {given}")
