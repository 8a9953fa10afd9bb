"""The task router: one Tune searcher over per-task Optuna studies (no Ray needed to drive it)."""

from __future__ import annotations

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from vpt_tune.search.router import TASK, TaskRouter
from vpt_tune.search.space import DefineByRun
from vpt_tune.spec import OBJECTIVES, Space

METRIC, MODE = list(OBJECTIVES), list(OBJECTIVES.values())


def _router(storage, budgets: dict[str, int], fixed: list[dict] = ()) -> TaskRouter:
    space = Space.model_validate({"num_prompts": {"int": [1, 64]}})
    searchers = {task: OptunaSearch(space=DefineByRun(space), metric=METRIC, mode=MODE, study_name=task,
                                    sampler=optuna.samplers.RandomSampler(seed=0), storage=storage)
                 for task in budgets}
    return TaskRouter(searchers, budgets, METRIC, MODE, fixed)


def _result(config: dict) -> dict:
    return {"val_acc": config["num_prompts"] / 100, "prompt_tokens": config["num_prompts"], "gflops": 1.0}


def test_trials_interleave_fairly_and_results_reach_their_task_study(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    router = _router(storage, {"a": 2, "b": 3})
    configs = {f"t{i}": router.suggest(f"t{i}") for i in range(5)}
    # each new trial goes to the task furthest behind its budget: a, b, b, a, b
    assert [c[TASK] for c in configs.values()] == ["a", "b", "b", "a", "b"]
    assert router.suggest("t5") == Searcher.FINISHED  # every budget used

    for trial_id, config in configs.items():
        router.on_trial_complete(trial_id, _result(config))
    for task in ("a", "b"):
        study = optuna.load_study(study_name=task, storage=storage)
        told = sorted(t.values[1] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        assert told == sorted(c["num_prompts"] for c in configs.values() if c[TASK] == task)


def test_saved_router_restores_its_budgets_and_pending_trials(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    router = _router(storage, {"a": 2, "b": 2})
    first, second = router.suggest("t0"), router.suggest("t1")
    router.on_trial_complete("t0", _result(first))
    router.save(str(tmp_path / "state.pkl"))  # t1 still running when the driver dies

    restored = _router(storage, {"a": 2, "b": 2})
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_complete("t1", _result(second))  # the running trial's result reaches its study
    assert [restored.suggest(f"t{i}")[TASK] for i in (2, 3)] == ["a", "b"]
    assert restored.suggest("t4") == Searcher.FINISHED
    study = optuna.load_study(study_name=second[TASK], storage=storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 1


def test_fixed_configs_go_first_as_they_are_and_reach_no_study(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    fixed = [{"reference_trial": {TASK: "a", "reference": "linear", "base_lr": lr}} for lr in (0.1, 1.0)]
    router = _router(storage, {"a": 1}, fixed)
    assert [router.suggest("r0"), router.suggest("r1")] == fixed
    searched = router.suggest("t0")
    assert searched[TASK] == "a" and "num_prompts" in searched
    router.save(str(tmp_path / "state.pkl"))  # every fixed config handed out: a restored router hands none again
    restored = _router(storage, {"a": 1}, fixed)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("t1") == Searcher.FINISHED

    for trial_id in ("r0", "r1"):  # a fixed trial's results reach no study
        restored.on_trial_result(trial_id, {"val_acc": 0.5, "prompt_tokens": 0, "gflops": 1.0})
        restored.on_trial_complete(trial_id, {"val_acc": 0.5, "prompt_tokens": 0, "gflops": 1.0})
    restored.on_trial_complete("t0", _result(searched))
    study = optuna.load_study(study_name="a", storage=storage)
    assert [t.values[1] for t in study.trials] == [searched["num_prompts"]]


def test_a_router_an_earlier_version_pickled_still_suggests(tmp_path):
    """Experiments begun before fixed configs existed restore a router without them: it goes on as before."""
    router = _router(optuna.storages.InMemoryStorage(), {"a": 1})
    del router.__dict__["fixed"]  # as unpickled from such an experiment
    assert router.suggest("t0")[TASK] == "a" and router.suggest("t1") == Searcher.FINISHED
