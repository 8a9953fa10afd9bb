"""make_sampler's budget-aware defaults and its no-repeat wrapper for spaces of choice lists."""

from __future__ import annotations

import optuna
import pytest

from vpt_tune.search.space import DefineByRun, make_sampler
from vpt_tune.spec import SearchSpec, Space

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# 12 configs: 2 num_prompts x (deep, or last_k x 2 depths) x 2 base_lr; depth only for last_k
CHOICES = Space(
    num_prompts={"choice": [1, 5]},
    placement={"choice": ["deep", "last_k"]},
    depth={"choice": [2, 4], "when": {"placement": ["last_k"]}},
    base_lr={"choice": [0.1, 1.0]},
)
N_CONFIGS = 12


def _study(name: str, space: Space, budget: int, seed: int = 0) -> optuna.Study:
    sampler = make_sampler(SearchSpec(sampler=name, trials_per_task=budget, seed=seed), space)
    return optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)


def _ask(study: optuna.Study, space: Space) -> optuna.Trial:
    trial = study.ask()
    DefineByRun(space)(trial)
    return trial


def _config(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


def _tell(study: optuna.Study, trial: optuna.Trial) -> None:
    # a front where the optimum is one config: the samplers' models would propose it again and again
    study.tell(trial, [trial.params["base_lr"] * trial.params["num_prompts"], trial.params.get("depth", 12)])


@pytest.mark.parametrize("budget, population", [(8, 4), (15, 4), (16, 4), (60, 12), (1000, 50)])
def test_nsga2_generations_fit_the_budget(budget, population):
    """Optuna's default population of 50 would keep a budget under 50 in its random first generation."""
    sampler = make_sampler(SearchSpec(sampler="nsga2", trials_per_task=budget))
    assert sampler.population_size == population  # a fifth of the budget, at least 4, at most 50


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random"])
def test_no_config_repeats_until_all_have_run(name):
    study = _study(name, CHOICES, budget=N_CONFIGS)
    configs = []
    for _ in range(N_CONFIGS + 2):
        trial = _ask(study, CHOICES)
        configs.append(_config(trial))
        _tell(study, trial)
    assert len(set(configs[:N_CONFIGS])) == N_CONFIGS  # every config once, the conditional depth included
    assert all(("depth" in dict(config)) == (dict(config)["placement"] == "last_k") for config in configs)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # past the grid: repeats


def test_running_trials_count_failed_ones_do_not():
    study = _study("tpe", CHOICES, budget=N_CONFIGS)
    running = [_ask(study, CHOICES) for _ in range(3)]  # concurrent trials, none told yet
    assert len({_config(trial) for trial in running}) == 3
    failed = _ask(study, CHOICES)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    later = []
    for _ in range(N_CONFIGS - 3):
        trial = _ask(study, CHOICES)
        later.append(_config(trial))
        _tell(study, trial)
    assert set(later).isdisjoint(_config(trial) for trial in running)
    assert _config(failed) in later  # a failed config is tried again


def test_seeded_with_the_wrapper():
    runs = []
    for _ in range(2):
        study = _study("tpe", CHOICES, budget=8, seed=3)
        runs.append([])
        for _ in range(8):
            trial = _ask(study, CHOICES)
            runs[-1].append(_config(trial))
            _tell(study, trial)
    assert runs[0] == runs[1]


def test_only_spaces_of_choice_lists_are_wrapped():
    ranged = Space(num_prompts={"int": [1, 8]}, base_lr={"choice": [0.1, 1.0]})
    assert type(make_sampler(SearchSpec(sampler="tpe"), ranged)) is optuna.samplers.TPESampler
    assert type(make_sampler(SearchSpec(sampler="tpe"), CHOICES).sampler) is optuna.samplers.TPESampler
