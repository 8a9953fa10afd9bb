"""The search spec: a YAML file turned into validated, typed objects with errors that name the key.

Strings may reference environment variables as ``${NAME}``; ``--set key.path=value`` overrides
are applied before validation. Unknown keys are errors. See README.md for every key.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model, field_validator, model_validator,
)

from vpt_tune.errors import UserError
from vpt_tune.methods import MAIN_METHODS, METHODS, REFERENCES, Options
from vpt_tune.models.placement import PLACEMENTS

OBJECTIVES = {"val_acc": "max", "prompt_tokens": "min", "gflops": "min"}
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Limits on the YAML of a spec (file, standard input or --set value), enforced while parsing so that no input
# can exhaust time, memory or the stack; real specs are a few KB, nest about 5 levels and hold a few hundred nodes.
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 50  # nested mappings/lists; PyYAML's composer recurses about 2 frames per level
MAX_SPEC_NODES = 100_000  # keys, values and collections, each alias counted as a copy of its anchor


class SpecError(UserError, ValueError):
    """A spec that cannot be used; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Param(_Strict):
    """A searched parameter: exactly one of ``int: [lo, hi]``, ``float: [lo, hi]``, ``choice: [...]``.

    ``log`` samples on a log scale, ``step`` quantises, ``when: {param: [values]}`` samples it only
    when an earlier parameter took one of those values.
    """

    int_range: tuple[int, int] | None = Field(None, alias="int")
    float_range: tuple[float, float] | None = Field(None, alias="float")
    choice: list[Any] | None = None
    log: bool = False
    step: float | None = None
    when: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Param":
        kinds = [k for k in ("int_range", "float_range", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of int: [low, high], float: [low, high] or choice: [...]")
        bounds = self.int_range or self.float_range
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"low {low} > high {high}: write the range as [low, high]")
            if self.log and low <= 0:
                raise ValueError(f"log: true needs a positive low bound, got {low}")
            if self.log and self.step is not None:
                raise ValueError("log and step cannot be combined (optuna samples one or the other)")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: [] is empty; list at least one value")
        return self

    def values(self) -> list[Any] | None:
        """The finite set of values this parameter can take, or None for a range."""
        return self.choice


def _searchable(fixed: Any) -> Any:
    """A spec entry that is either a :class:`Param` (a mapping) or a fixed value of type ``fixed``."""
    return Annotated[
        Union[Annotated[Param, Tag("searched")], Annotated[fixed, Tag("fixed")]],
        Discriminator(lambda v: "searched" if isinstance(v, (dict, Param)) else "fixed"),
    ]


class _CoreSpace(_Strict):
    """What each trial samples: every entry is a :class:`Param` or a fixed value. The prompt and optimiser
    entries below are the core's; each method adds its own (:attr:`vpt_tune.methods.Method.space`)."""

    num_prompts: _searchable(int) = 10
    placement: _searchable(str) = "deep"
    depth: _searchable(int) | None = None
    layers: list[int] | None = None
    base_lr: _searchable(float) = 1.0
    weight_decay: _searchable(float) = 0.0
    prompt_dropout: _searchable(float) = 0.0

    @model_validator(mode="after")
    def _check(self) -> "_CoreSpace":
        placements = self.placement.values() if isinstance(self.placement, Param) else [self.placement]
        if placements is None or any(p not in PLACEMENTS for p in placements):
            raise ValueError(f"placement values must be among {list(PLACEMENTS)}, got {placements}")
        if any(p in ("first_k", "last_k") for p in placements) and self.depth is None:
            raise ValueError("placement first_k/last_k needs `depth` (an int or a Param)")
        if "layers" in placements and not self.layers:
            raise ValueError("placement 'layers' needs `layers: [block indices]`")
        values = {name: _values(entry) for name, entry in self}
        for method in METHODS.values():
            method.check_space(values)
        names = list(type(self).model_fields)
        for name, param in self.searched().items():
            for ref in param.when or {}:
                if ref not in names[: names.index(name)]:
                    raise ValueError(f"{name}.when refers to {ref!r}, which is not a parameter listed before it")
        if not self.searched():
            raise ValueError("the search space is empty: make at least one entry a Param (int/float/choice)")
        return self

    def searched(self) -> dict[str, Param]:
        """The entries that are searched, in order."""
        return {name: value for name, value in self if isinstance(value, Param)}


def _values(entry: Param | Any) -> list:
    """The values a space entry can take: a Param's choices or range bounds, a fixed value, or none."""
    if isinstance(entry, Param):
        return entry.values() or list(entry.float_range or entry.int_range)
    return [] if entry is None else [entry]


Space = create_model(
    "Space", __base__=_CoreSpace, __doc__=_CoreSpace.__doc__,
    **{name: (_searchable(entry.kind) | None, entry.default) for m in METHODS.values() for name, entry in m.space.items()},
)


class BackboneSpec(_Strict):
    """``model``: a timm ViT name; ``weights``: ``demo``, ``random``, ``hub`` or a local file."""

    model: str = "vit_small_patch14_dinov2"
    weights: str = "demo"
    img_size: int = Field(56, gt=0)


class DataSpec(_Strict):
    """``root``: the benchmark's folder, or null for the built-in demo tasks (VTAB-1k layout);
    ``tasks``: task names (any known folder alias), groups (``vtab-natural``, ``fgvc-all``...) or ``all``."""

    root: str | None = None
    benchmark: Literal["vtab-1k", "fgvc"] = "vtab-1k"
    tasks: list[str] = Field(default_factory=lambda: ["digits"], min_length=1)


class TrainSpec(_Strict):
    """Schedule shared by every trial."""

    epochs: int = Field(10, gt=0)
    warmup_epochs: float = Field(1.0, ge=0)
    batch_size: int = Field(32, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    seed: int = 0
    prefix_cache: bool = True
    reuse_base: bool = True  # trials differing only in condensation settings share one trained model
    checkpoint_every: int = Field(1, gt=0)  # epochs between trial checkpoints (a restart continues from the last)
    max_failures: int = Field(2, ge=0)  # restarts of a trial's workers after a crash or a lost node


class EarlyStoppingSpec(_Strict):
    """Stopping hopeless trials at rungs of ``min_epochs * reduction_factor**k`` base-training epochs
    (see :mod:`vpt_tune.search.scheduler`). ``rule``: ``off`` (every trial trains its whole schedule),
    ``mo_asha`` (continue only in the top 1/reduction_factor of the task's trials at the rung, ranked on
    the fronts of rung accuracy, tokens and GFLOPs) or ``known_cost`` (``mo_asha``, and also stop a trial
    whose optimistic final accuracy a finished trial at no greater cost already beats)."""

    rule: Literal["off", "mo_asha", "known_cost"] = "off"
    min_epochs: int = Field(1, gt=0)
    reduction_factor: int = Field(3, ge=2)

    @field_validator("rule", mode="before")
    @classmethod
    def _off_is_false_in_yaml(cls, rule: Any) -> Any:  # YAML 1.1 reads a bare `off` as false
        return "off" if rule is False else rule

    def rungs(self, epochs: int) -> list[int]:
        """The rung epochs of a schedule of ``epochs`` base-training epochs (none when off)."""
        return [] if self.rule == "off" else rung_epochs(self.min_epochs, self.reduction_factor, epochs)


def rung_epochs(min_epochs: int, reduction_factor: int, epochs: int) -> list[int]:
    """The rung epochs ``min_epochs * reduction_factor**k`` before the last base-training epoch."""
    rungs, rung = [], min_epochs
    while rung < epochs:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


class SearchSpec(_Strict):
    """Budget and sampler of the search."""

    sampler: str = "tpe"
    trials_per_task: int = Field(16, gt=0)
    seed: int = 0
    max_concurrent_trials: int | None = Field(None, gt=0)
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    # reference points trained per task beside the search, each on its own lr grid (its section's base_lrs)
    references: list[str] = Field(default_factory=list)

    @field_validator("references")
    @classmethod
    def _check_references(cls, references: list[str]) -> list[str]:
        unknown = [name for name in references if name not in REFERENCES]
        if unknown:
            raise ValueError(f"unknown reference {unknown[0]!r}; choose among {', '.join(REFERENCES)}")
        if len(set(references)) < len(references):
            raise ValueError(f"a reference is listed twice in {references}")
        return references

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, sampler: str) -> str:  # a field validator: the error names search.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        return sampler


class ResourcesSpec(_Strict):
    """Ray Train workers of one trial and what each holds."""

    workers_per_trial: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    # auto: GPUs shared by as many trials as fit their measured memory (vpt_tune.search.packing), CPU without GPUs
    gpus_per_worker: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.0
    # true: trials run one after another on long-lived worker groups, one per trial at a time (see
    # vpt_tune.search.slots); false: each trial starts a Ray Train run of its own (a fresh process per trial)
    slots: bool = True

    @property
    def gpus(self) -> float:
        """GPUs per worker once decided (``auto`` before the search decides it: none)."""
        return 0.0 if self.gpus_per_worker == "auto" else self.gpus_per_worker

    def per_worker(self) -> dict[str, float]:
        """What one Train worker asks Ray for: CPUs, and GPUs when it asks for some."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus} if self.gpus > 0 else {})}

    def workers_on(self, node: dict[str, float]) -> int:
        """How many Train workers a node with ``node``'s resources holds (Ray places each worker whole),
        counted in Ray's fixed-point resource units (1e-4), where 1 // 0.1 == 9 in floats."""
        return min(round(node.get(kind, 0) * 10_000) // max(round(amount * 10_000), 1)
                   for kind, amount in self.per_worker().items())


class FinalSpec(_Strict):
    """The papers' protocol after the search: each task's Pareto-optimal configs are retrained on the
    benchmark's final training split (VTAB-1k: train800val200; FGVC: train) once per seed and tested
    once. ``seeds: []`` (the default) skips it."""

    seeds: list[int] = Field(default_factory=list)


class TrackingSpec(_Strict):
    """Where MLflow runs go (``mlflow_uri`` null: ``sqlite:///mlflow.db`` in the working directory)."""

    mlflow_uri: str | None = None
    experiment: str = "vpt-tune"


class _CoreSpec(_Strict):
    """A whole search; each method with options has a section of its own (see :data:`Spec`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backbone: BackboneSpec = BackboneSpec()
    data: DataSpec = DataSpec()
    method: str = "vpt"
    objectives: list[str] = Field(default_factory=lambda: list(OBJECTIVES))
    space: Space
    train: TrainSpec = TrainSpec()
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    final: FinalSpec = FinalSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str = "vpt_results"

    @field_validator("method")
    @classmethod
    def _check_method(cls, method: str) -> str:
        if method not in MAIN_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(MAIN_METHODS)}")
        return method

    @model_validator(mode="after")
    def _check(self) -> "_CoreSpec":
        if sorted(self.objectives) != sorted(OBJECTIVES):
            raise ValueError(f"objectives must be {list(OBJECTIVES)} (other objectives are not supported yet)")
        if self.search.sampler == "grid":  # Optuna's GridSampler: a finite product of listed values
            for name, param in self.space.searched().items():
                if param.choice is None or param.when:
                    raise ValueError(f"search.sampler grid needs every searched entry as an unconditional "
                                     f"`choice: [...]`; space.{name} is not (list its values, or pick tpe)")
        stopping = self.search.early_stopping
        if stopping.rule != "off" and stopping.min_epochs >= self.train.epochs:
            raise ValueError(f"search.early_stopping.min_epochs: {stopping.min_epochs} leaves no rung before the last "
                             f"of train.epochs {self.train.epochs}; lower it or set search.early_stopping.rule: off")
        chosen = METHODS[self.method]
        for method in METHODS.values():
            if method.reference:  # its section is unused unless listed: --set search.references=[] turns them off
                continue
            if method.main and method is chosen or not method.main and chosen.sequence_prompts:
                continue
            need = f"`method: {method.name}`" if method.main else f"a method whose prompts join the sequence, not {self.method}"
            for name, entry in method.space.items():
                value = getattr(self.space, name)
                if isinstance(value, Param) or value not in (None, entry.off):
                    raise ValueError(f"space.{name} needs {need} (a {method.name} setting)")
            if method.options is not None and self.method_options(method.name) != method.options():
                raise ValueError(f"{method.name} options need {need}")
        return self


    def method_options(self, name: str) -> Options | None:
        """The options section of the method called ``name`` (None if it has none)."""
        return getattr(self, name, None)

    def job_options(self) -> dict[str, dict]:
        """Every method's options as plain values, by method name (what a trial's job carries)."""
        return {m.name: self.method_options(m.name).model_dump() for m in METHODS.values() if m.options is not None}


Spec = create_model(
    "Spec", __base__=_CoreSpec, __doc__=_CoreSpec.__doc__,
    **{m.name: (m.options, m.options()) for m in METHODS.values() if m.options is not None},
)
# Keys that moved into a method's section: an old spec gets a line saying where.
MOVED_KEYS = {("train", "condense_epochs"): "condensation.epochs", ("train", "condense_per_block"): "condensation.per_block",
              ("train", "prune_epochs"): "e2vpt.prune_epochs"}


def builtin_spec(name: str) -> Path | None:
    """The packaged spec called ``name`` (``demo`` or ``demo.yaml``), if there is one."""
    path = resources.files("vpt_tune") / "search_spaces" / (name if name.endswith(".yaml") else f"{name}.yaml")
    return Path(str(path)) if path.is_file() else None


def load_spec(path: str | Path, overrides: list[str] = (), require_env: bool = True) -> Spec:
    """Read, expand, override and validate a spec file (a built-in spec name, or ``-``: standard input).
    ``require_env=False`` keeps a reference to an unset environment variable as it is written (a plan
    made before the data has a folder)."""
    stdin = str(path) == "-"
    path = Path("<stdin>" if stdin else path)
    if not stdin and not path.is_file() and (len(path.parts) == 1 or path.parts[0] == "search_spaces"):
        path = builtin_spec(path.name) or path  # `demo` or `search_spaces/demo.yaml` from any directory
    if not stdin and not path.is_file():
        folder = resources.files("vpt_tune") / "search_spaces"
        builtins = sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))
        raise SpecError(f"{path}: spec file not found (built-in specs: {', '.join(builtins)})")
    raw = _load_yaml(_read_spec_text(path, stdin), str(path))
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping of keys (name, space, train, ...)")
    for override in overrides:
        _apply_override(raw, override, path)
    return validate(_expand_env(raw, path, require=require_env), path)


def validate(raw: dict, source: str | Path = "<spec>") -> Spec:
    """Validate a spec mapping; errors name every offending key path."""
    for (section, key), moved in MOVED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise SpecError(f"{source}: {section}.{key} is now {moved}: move it there")
    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"] if p not in ("searched", "fixed"))
            key = key.replace("int_range", "int").replace("float_range", "float")
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message += _valid_keys_hint(e["loc"])
            elif e["type"] not in ("value_error", "missing"):  # a wrong type or value: show what was given
                message += f" (got {_short(e['input'])})"
            problems.append(f"{key or '(top level)'}: {message}")
        if len(problems) == 1:  # one line: file, key, problem and fix
            raise SpecError(f"{source}: {problems[0]}") from None
        raise SpecError(f"{source}: {len(problems)} problems in the spec\n  " + "\n  ".join(problems)) from None


def _valid_keys_hint(loc: tuple) -> str:
    """`` (did you mean X? valid keys here: ...)`` for the unknown key at ``loc``, or "" if not found."""
    model: Any = Spec
    for part in loc[:-1]:
        if part in ("searched", "fixed"):  # the tags of a searchable entry (the fixed value has no keys)
            model = Param if part == "searched" else None
        else:
            field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
            model = _model_in(field.annotation) if field else None
        if model is None:
            return ""
    keys = [f.alias or name for name, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    return f" ({f'did you mean {close[0]}? ' if close else ''}valid keys here: {', '.join(keys)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``X``, ``X | None``, a searchable entry), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _apply_override(raw: dict, override: str, source: Path) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set {override!r}: expected key.path=value, e.g. --set search.trials_per_task=8")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {override!r}: {part!r} in {source} is not a mapping")
    node[leaf] = _load_yaml(value, f"--set {override!r}")  # its size is bounded by the OS's argument limit


def _read_spec_text(path: Path, stdin: bool) -> str:
    """The spec's text: at most MAX_SPEC_BYTES of UTF-8, read without loading more than that."""
    try:
        if stdin:
            data = sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)
        else:
            with path.open("rb") as file:
                data = file.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.strerror})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES:,} bytes, the limit for a spec "
                        f"(a spec is a few KB: keep data and generated lists out of it)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SpecError(f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} "
                        f"(line {line}); save the spec as UTF-8") from None


def _load_yaml(text: str, source: str) -> Any:
    """One YAML document, parsed by :class:`_SpecLoader`; every problem is a one-line SpecError at
    ``source:line:column``."""
    try:
        loader = _SpecLoader(text, source)  # checks every character first: a ReaderError comes from here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        column = err.position - text.rfind("\n", 0, err.position)
        raise SpecError(f"{source}:{line}:{column}: not valid YAML: character #x{err.character:04x} is not "
                        f"allowed in YAML: delete it") from None
    except yaml.MarkedYAMLError as err:
        message = err.problem
        if err.context:  # e.g. "while parsing a flow sequence", and where that began
            message += f" ({err.context}" + (f" at line {err.context_mark.line + 1})" if err.context_mark else ")")
        message = " ".join(message.split())  # one line
        raise SpecError(f"{_at(source, err.problem_mark)}: not valid YAML: {message}") from None


def _at(source: str, mark: yaml.Mark) -> str:
    """``source:line:column``, both counted from 1 (PyYAML's marks count from 0)."""
    return f"{source}:{mark.line + 1}:{mark.column + 1}"


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader refusing, as a SpecError, what could exhaust the machine or silently lose keys:
    nesting deeper than MAX_SPEC_DEPTH, more than MAX_SPEC_NODES nodes once aliases are expanded (an alias
    bomb), an alias inside its own anchor (a loop) and duplicate keys.

    Depth and size are counted on the event stream as the composer pulls it. PyYAML's scanner and parser
    are iterative state machines, so this stops a deep or explosive document before the composer and
    constructor recurse into it and before any Python object exists, in the same single pass over the
    text (a separate ``yaml.parse`` pre-pass would scan it twice). An alias counts the memoised size of
    its anchor, so a bomb is refused after a few hundred events, without expanding anything.
    """

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self._source = source
        self._open: list[list] = [[None, 0]]  # [anchor, node count so far] of the stream and each open collection
        self._sizes: dict[str, int] = {}  # expanded node count of each finished anchored node

    def get_event(self) -> yaml.Event:
        event = super().get_event()
        if isinstance(event, yaml.CollectionStartEvent):
            if len(self._open) > MAX_SPEC_DEPTH:
                raise SpecError(f"{_at(self._source, event.start_mark)}: nested deeper than {MAX_SPEC_DEPTH} "
                                f"levels, the limit for a spec (a spec needs a handful: flatten it)")
            self._open.append([event.anchor, 1])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size = self._open.pop()
            self._count(event, anchor, size)
        elif isinstance(event, yaml.ScalarEvent):
            self._count(event, event.anchor, 1)
        elif isinstance(event, yaml.AliasEvent):
            self._count(event, None, self._alias_size(event))
        return event

    def _alias_size(self, event: yaml.AliasEvent) -> int:
        if event.anchor in self._sizes:
            return self._sizes[event.anchor]
        if any(anchor == event.anchor for anchor, _ in self._open):
            raise SpecError(f"{_at(self._source, event.start_mark)}: alias *{event.anchor} is inside its own "
                            f"anchor &{event.anchor} (a loop): copy the values instead")
        return 1  # an undefined alias: the composer reports it with its position

    def _count(self, event: yaml.Event, anchor: str | None, size: int) -> None:
        """Add a finished node of ``size`` expanded nodes to its parent (a lower bound of the total)."""
        if anchor is not None:
            self._sizes[anchor] = size
        self._open[-1][1] += size
        if self._open[-1][1] > MAX_SPEC_NODES:
            cause = f"alias *{event.anchor} (an alias bomb?)" if isinstance(event, yaml.AliasEvent) else "here"
            raise SpecError(f"{_at(self._source, event.start_mark)}: more than {MAX_SPEC_NODES:,} YAML nodes once "
                            f"aliases (*name) are expanded, the limit for a spec, reached at {cause}; a spec "
                            f"needs a few hundred: copy less through aliases, keep data out of the spec")

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        # Checked on the nodes, as written: at construction, merge keys (<<) have already been flattened
        # into some mappings, whose explicit keys legitimately override merged ones.
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":  # `<<` merges, may repeat
                seen = first.setdefault((key.tag, key.value), key)
                if seen is not key:
                    raise SpecError(f"{_at(self._source, key.start_mark)}: duplicate key {key.value!r} (first at "
                                    f"line {seen.start_mark.line + 1}); YAML would keep only the last: merge the "
                                    f"two or delete one")
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, AttributeError):  # SafeConstructor on `2024-13-01`, `!!int x`, `!!bool x`...
            if not isinstance(node, yaml.ScalarNode):
                raise
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {kind}: fix it, or quote it to keep the text",
                node.start_mark) from None


def _expand_env(node: Any, source: Path, key: str = "", require: bool = True) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, source, f"{key}.{k}" if key else str(k), require) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, source, f"{key}[{i}]", require) for i, v in enumerate(node)]
    if isinstance(node, str):
        for var in _ENV_VAR.findall(node):
            if var not in os.environ and require:
                raise SpecError(f"{source}: {key}: environment variable ${{{var}}} is not set (export {var}=...)")
        return _ENV_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), node)
    return node
