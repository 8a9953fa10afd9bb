"""Spec search space -> Optuna define-by-run function and samplers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from vpt_tune.spec import Param, SearchSpec, Space


def _suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if param.int_range is not None:
        step = int(param.step or 1)
        return trial.suggest_int(name, *param.int_range, log=param.log, step=step)
    if param.float_range is not None:
        return trial.suggest_float(name, *param.float_range, log=param.log, step=param.step)
    return trial.suggest_categorical(name, param.choice)


MAX_NO_REPEAT_CONFIGS = 100_000  # beyond this many configs repeats are rare anyway and listing them costs


def _active(param: Param, values: dict[str, Any]) -> bool:
    """Whether ``param`` is sampled, given the values of the entries before it (its ``when``)."""
    return all(values.get(ref) in allowed for ref, allowed in (param.when or {}).items())


def _walk(space: Space, pick: Callable[[str, Param], Any]) -> dict[str, Any]:
    """The values of ``space``'s entries in order, as a trial samples them: fixed ones as they are,
    each searched one whose ``when`` matches the values before it from ``pick(name, param)``."""
    values: dict[str, Any] = {}
    for name, entry in space:
        if entry is None:
            continue
        if not isinstance(entry, Param):
            values[name] = entry
        elif _active(entry, values):
            values[name] = pick(name, entry)
    return values


class DefineByRun:
    """An Optuna define-by-run function sampling a spec's space; returns the fixed (unsearched) values.

    Entries with ``when`` are sampled only if the earlier values match, so e.g. ``depth`` exists
    only for first_k/last_k placements (a conditional, tree-structured space). A class rather than
    a closure so Tune can pickle the searcher into its experiment checkpoint.
    """

    def __init__(self, space: Space):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values = _walk(self.space, lambda name, param: _suggest(trial, name, param))
        searched = self.space.searched()
        return {name: value for name, value in values.items() if name not in searched}


def _configs(space: Space) -> list[dict[str, Any]]:
    """Every config of a space whose searched entries are all choice lists (searched values only), as
    :class:`DefineByRun` walks it: an entry whose ``when`` does not match is absent."""
    walks: list[dict[str, Any]] = [{}]  # the values of every entry so far, fixed ones included
    for name, entry in space:
        if entry is None:
            continue
        grown = []
        for values in walks:
            if not isinstance(entry, Param):
                grown.append({**values, name: entry})
            elif _active(entry, values):
                grown.extend({**values, name: choice} for choice in entry.choice)
            else:
                grown.append(values)
        walks = grown
    searched = space.searched()
    return [{name: value for name, value in values.items() if name in searched} for values in walks]


class _NoRepeats(optuna.samplers.BaseSampler):
    """Wraps a sampler of a space of choice lists so that no trial repeats a config that has run or is
    running, until every config has: search trials all train with ``train.seed``, so a repeat pays a
    whole training for a result already known. Failed trials do not count: their configs may be tried
    again (the failure may have been transient; trials of a killed driver are failed without running).

    The wrapped sampler proposes a whole config (its relative sample, the rest from its independent
    sampling); if that config was seen, the unseen config that differs from it the least (the fewest
    (name, value) pairs not shared; ties at random) is used instead, so the sampler's choice is kept
    as far as possible.
    """

    _SEEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def __init__(self, sampler: optuna.samplers.BaseSampler, space: Space, seed: int):
        self.sampler = sampler
        self._space = space
        self._configs = [frozenset(config.items()) for config in _configs(space)]
        self._distributions = {name: CategoricalDistribution(param.choice) for name, param in space.searched().items()}
        self._rng = np.random.RandomState(seed)

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._distributions

    def sample_relative(self, study, trial: FrozenTrial, search_space) -> dict[str, Any]:
        relative = self.sampler.sample_relative(study, trial, self.sampler.infer_relative_search_space(study, trial))
        values = _walk(self._space, lambda name, _: relative[name] if name in relative
                       else self.sampler.sample_independent(study, trial, name, self._distributions[name]))
        proposal = frozenset((name, value) for name, value in values.items() if name in self._distributions)
        seen = {frozenset(t.params.items()) for t in study.get_trials(deepcopy=False, states=self._SEEN)}
        unseen = [config for config in self._configs if config not in seen] or self._configs
        differences = np.array([len(config ^ proposal) for config in unseen])  # (name, value) pairs not shared
        nearest = np.flatnonzero(differences == differences.min())
        return dict(unseen[nearest[self._rng.randint(len(nearest))]])

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
        self._rng.seed()


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for ask/tell use: it calls ``study.stop()`` once the grid is exhausted,
    which raises outside ``study.optimize`` (and would leave the last trial unfinished); Tune stops
    on its own budget, so that call is skipped."""

    def after_trial(self, study, trial, state, values) -> None:
        try:
            super().after_trial(study, trial, state, values)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise


def make_sampler(search: SearchSpec, space: Space | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in the spec, seeded, with defaults scaled to the per-task budget
    (``search.trials_per_task``; the search builds one sampler per task study).

    - ``tpe`` and ``gp`` model the results after a third of the budget (at least 4, at most Optuna's
      default 10 random trials), so small budgets still get guided trials. TPE uses the
      ``constant_liar`` (Optuna's default only from 5.0): trials run in parallel under Tune, and
      running trials count as bad results, so concurrent trials are not proposed alike.
    - ``nsga2`` breeds generations of a fifth of the budget (at least 4, at most Optuna's default 50):
      about five generations fit, where the default population of 50 would leave a budget under
      50 trials in its random first generation.
    - ``grid`` walks the product of the ``space``'s choice lists in random order (the papers' base_lr
      x weight_decay x prompts baseline).

    Given a ``space`` of choice lists only (at most :data:`MAX_NO_REPEAT_CONFIGS` configs), the other
    samplers never repeat a config that has run or is running, until every config has (see
    :class:`_NoRepeats`); the grid never repeats anyway.
    """
    budget, seed = search.trials_per_task, search.seed
    startup = min(10, max(4, budget // 3))
    if search.sampler == "grid":
        if space is None:
            raise ValueError("the grid sampler needs the search space")
        return _GridSampler({n: p.choice for n, p in space.searched().items()}, seed=seed)
    if search.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(multivariate=True, group=True, n_startup_trials=startup,
                                             constant_liar=True, seed=seed)
    elif search.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=min(50, max(4, budget // 5)), seed=seed)
    elif search.sampler == "gp":
        sampler = optuna.samplers.GPSampler(n_startup_trials=startup, seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    choices = [param.choice for param in space.searched().values()] if space is not None else [None]
    if all(c is not None for c in choices) and math.prod(len(c) for c in choices) <= MAX_NO_REPEAT_CONFIGS:
        return _NoRepeats(sampler, space, seed)
    return sampler


def sample_configs(space: Space, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` configs of ``space`` drawn at random by Optuna's RandomSampler (fixed values included),
    as trials would see them: what a plan averages its costs over."""
    optuna.logging.disable_default_handler()  # no "A new study created in memory" line
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    finally:
        optuna.logging.enable_default_handler()
    define = DefineByRun(space)
    configs = []
    for _ in range(count):
        trial = study.ask()
        fixed = define(trial)
        configs.append({**fixed, **trial.params})
    return configs
