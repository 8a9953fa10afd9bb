"""One Tune experiment, one Optuna study per task: a searcher that routes trials by task.

Tune drives one searcher per experiment; Ray's OptunaSearch drives one study. A search over many
tasks wants both: one experiment (so trials of every task share the cluster and one resume) and a
study per task (each task has its own front; its sampler models only its own results). Neither Ray
nor Optuna routes between studies, so :class:`TaskRouter` does, in a few lines: it hands each new
trial to the task furthest behind its budget (fair interleaving), tags the config with the task,
and sends results back to that task's searcher. Fixed configs (the reference points' trials) go
first, as they are, and their results to no study.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.search import Searcher

TASK = "task"  # config key naming a trial's task


class TaskRouter(Searcher):
    """Routes suggestions and results between per-task searchers (``searchers[task]``), each with a
    budget of ``budgets[task]`` trials, after handing out the ``fixed`` configs; FINISHED once every
    task has used its budget."""

    fixed: list[dict[str, Any]] = []  # none in a router an earlier version pickled with its experiment (never changed)

    def __init__(self, searchers: dict[str, Searcher], budgets: dict[str, int], metric: list[str], mode: list[str],
                 fixed: list[dict[str, Any]] = ()):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.budgets = budgets
        self.fixed = list(fixed)  # still to hand out
        self.started = dict.fromkeys(searchers, 0)
        self.task_of: dict[str, str] = {}  # Tune trial id -> task (a study's trials only)

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self.fixed:
            return self.fixed.pop(0)
        open_tasks = [task for task in self.searchers if self.started[task] < self.budgets[task]]
        if not open_tasks:
            return Searcher.FINISHED
        task = min(open_tasks, key=lambda t: self.started[t] / self.budgets[t])  # first among the least advanced
        self.started[task] += 1
        self.task_of[trial_id] = task
        return {**self.searchers[task].suggest(trial_id), TASK: task}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.task_of:
            self.searchers[self.task_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.task_of:
            self.searchers[self.task_of[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
