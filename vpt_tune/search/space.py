"""Spec search space -> Optuna define-by-run function and samplers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from vpt_tune.spec import Param, SearchSpec, Space


def _suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if param.int_range is not None:
        step = int(param.step or 1)
        return trial.suggest_int(name, *param.int_range, log=param.log, step=step)
    if param.float_range is not None:
        return trial.suggest_float(name, *param.float_range, log=param.log, step=param.step)
    return trial.suggest_categorical(name, param.choice)


def define_by_run(space: Space) -> Callable[[optuna.Trial], dict[str, Any]]:
    """An Optuna define-by-run function sampling ``space``; it returns the fixed (unsearched) values.

    Entries with ``when`` are sampled only if the earlier values match, so e.g. ``depth`` exists
    only for first_k/last_k placements (a conditional, tree-structured space).
    """

    def sample(trial: optuna.Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name, entry in space:
            if entry is None:
                continue
            if not isinstance(entry, Param):
                values[name] = fixed[name] = entry
            elif all(values.get(ref) in allowed for ref, allowed in (entry.when or {}).items()):
                values[name] = _suggest(trial, name, entry)
        return fixed

    return sample


def make_sampler(search: SearchSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in the spec, seeded."""
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=search.seed)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=search.seed)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=search.seed)
    return optuna.samplers.RandomSampler(seed=search.seed)
