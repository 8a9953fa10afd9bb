"""Multi-objective early stopping: trials stop at rungs when they rank low on the task's fronts so far.

Why ours: Ray Tune's schedulers rank trials by one scalar metric, Optuna refuses ``trial.report`` in
multi-objective studies, and Syne Tune's MOASHA runs on neither. vpt-tune also knows two of its three
objectives (``prompt_tokens``, ``gflops``) before a trial trains; only accuracy is learned over epochs.

Rungs sit at ``min_epochs * reduction_factor**k`` base-training epochs (before the last one; pruning
and condensation epochs never count). When a trial reports a rung epoch, :class:`Rungs` decides:

``mo_asha``
    Asynchronous successive halving on Pareto ranks (Schmucker et al. 2021): among the trials of the
    task that reached this rung (itself included), ranked by non-dominated sorting on (rung accuracy,
    tokens, GFLOPs) and, inside a front, by crowding distance, the trial continues unless
    ``ceil(n / reduction_factor)`` or more trials rank strictly ahead of it. Crowding distance (not an
    epsilon-net) because it needs no epsilon, is exact to reproduce, and gives a front's extremes (the
    cheapest and the most accurate trial) infinite distance, so they are never stopped for spread.
``known_cost``
    ``mo_asha``, and beyond it: stop a trial whose optimistic final accuracy (its rung accuracy plus
    the largest rung-to-final gain of the task's finished trials, at least 0) is still dominated by a
    finished trial of no greater tokens and GFLOPs. A trial cheaper than every finished trial is never
    stopped by this rule: only a finished trial at no greater cost can dominate it.

Decisions depend only on the order of results, are made once per trial and rung (a trial that resumes
from an earlier checkpoint and reports a rung again gets the same answer), and the records travel with
Tune's experiment state (:class:`RungJudge`), so a resumed search decides as the uninterrupted one. A
stopped trial's workers end its Train run themselves (:mod:`vpt_tune.train.rung_decision`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from vpt_tune.search.driver import is_reference, trial_task
from vpt_tune.search.pareto import crowding_distance, nondominated_ranks
from vpt_tune.search.results import MLFLOW_RUN_ID, STOPPED_AT
from vpt_tune.spec import rung_epochs
from vpt_tune.train.rung_decision import RUNG_DECISION, tell
from vpt_tune.train.worker import COMPLETE


Point = tuple[float, float, float]  # (accuracy, prompt_tokens, gflops)


def _minimised(points: list[Point]) -> np.ndarray:
    """Points as costs to minimise: accuracy negated; a missing or NaN accuracy (diverged) is the worst."""
    return np.array([[-a if a == a and a is not None else math.inf, t, g] for a, t, g in points], dtype=float)


def pareto_rank_keeps(points: list[Point], index: int, reduction_factor: int) -> bool:
    """Whether ``points[index]`` is among the top ``1 / reduction_factor`` of ``points`` (MO-ASHA): fewer than
    ``ceil(n / reduction_factor)`` points rank strictly ahead of it by (front, crowding distance)."""
    costs = _minimised(points)
    costs[np.isinf(costs)] = np.finfo(float).max  # a worst accuracy, still ordered (inf - inf is nan)
    ranks = nondominated_ranks(costs)
    crowding = np.zeros(len(points))
    for front in np.unique(ranks):
        crowding[ranks == front] = crowding_distance(costs[ranks == front])
    mine = ranks[index]
    ahead = int(((ranks < mine) | ((ranks == mine) & (crowding > crowding[index]))).sum())
    return ahead < math.ceil(len(points) / reduction_factor)


def dominated_by_finished(optimistic: float, costs: tuple[float, float], finished: list[Point]) -> bool:
    """Whether a finished trial at no greater tokens and GFLOPs dominates (``optimistic``, ``costs``)."""
    tokens, gflops = costs
    return any(
        acc >= optimistic and t <= tokens and g <= gflops and (acc > optimistic or t < tokens or g < gflops)
        for acc, t, g in finished
    )


@dataclass
class Rungs:
    """Rung records and stop decisions of every task's trials (plain data: saved and restored as is)."""

    rule: str
    min_epochs: int = 1
    reduction_factor: int = 3
    epochs: int = 1  # base-training epochs of a trial
    records: dict[str, dict[int, dict[str, Point]]] = field(default_factory=dict)  # task -> rung -> trial -> point
    finished: dict[str, dict[str, Point]] = field(default_factory=dict)  # task -> trial -> final point
    decisions: dict[str, dict[int, bool]] = field(default_factory=dict)  # trial -> rung -> continues
    stopped: dict[str, int] = field(default_factory=dict)  # trial -> the rung epoch it stopped at

    @property
    def rungs(self) -> list[int]:
        return rung_epochs(self.min_epochs, self.reduction_factor, self.epochs) if self.rule != "off" else []

    def judge(self, task: str, trial: str, epoch: int, accuracy: float | None, costs: tuple[float, float]) -> bool:
        """Whether ``trial`` continues after reporting ``accuracy`` at base-training ``epoch`` (True off a rung)."""
        if epoch not in self.rungs:
            return trial not in self.stopped
        made = self.decisions.setdefault(trial, {})
        if epoch in made:  # reported again after a restart from an earlier checkpoint
            return made[epoch]
        at_rung = self.records.setdefault(task, {}).setdefault(epoch, {})
        at_rung[trial] = (accuracy, *costs)
        keeps = pareto_rank_keeps(list(at_rung.values()), list(at_rung).index(trial), self.reduction_factor)
        if keeps and self.rule == "known_cost":
            keeps = not self._hopeless(task, epoch, accuracy, costs)
        made[epoch] = keeps
        if not keeps:
            self.stopped[trial] = epoch
        return keeps

    def _hopeless(self, task: str, epoch: int, accuracy: float | None, costs: tuple[float, float]) -> bool:
        """Known-cost rule: even the optimistic final accuracy is dominated by a finished trial at no
        greater cost. Needs a finished trial that reported this rung (for the gain)."""
        finished, at_rung = self.finished.get(task, {}), self.records[task][epoch]
        gains = [final[0] - at_rung[trial][0] for trial, final in finished.items()
                 if trial in at_rung and at_rung[trial][0] is not None]
        if not gains or accuracy is None or accuracy != accuracy:
            return False
        return dominated_by_finished(accuracy + max(0.0, max(gains)), costs, list(finished.values()))

    def finish(self, task: str, trial: str, accuracy: float, costs: tuple[float, float]) -> None:
        """Record a trial that trained its whole schedule, with its final accuracy and cost."""
        self.finished.setdefault(task, {})[trial] = (accuracy, *costs)

    def state(self) -> dict[str, Any]:
        return {"records": self.records, "finished": self.finished, "decisions": self.decisions,
                "stopped": self.stopped}

    def load_state(self, state: dict[str, Any]) -> None:
        self.records, self.finished = state["records"], state["finished"]
        self.decisions, self.stopped = state["decisions"], state["stopped"]


def _costs(result: dict) -> tuple[float, float]:
    return float(result["prompt_tokens"]), float(result["gflops"])


class RungJudge(tune.Callback):
    """The early-stopping scheduler of a search, as a Tune callback: judges each rung report with
    :class:`Rungs`, writes the decision to the file the report names (the trial's workers wait for it
    and, told to stop, end their Train run themselves: see :mod:`vpt_tune.train.rung_decision`), marks
    a stopped trial's rung result with :data:`STOPPED_AT` (which the searcher, the trial table and MLflow
    read), learns finished trials' final points, and keeps its records with Tune's experiment state.

    A callback, not a Tune ``TrialScheduler``: it never stops a trial itself (see rung_decision), and
    Tune saves callback state with the experiment, scheduler state not."""

    def __init__(self, rungs: Rungs):
        self.rungs = rungs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if RUNG_DECISION not in result:  # not a rung report (final retrains never make one)
            return
        epoch = int(result["epoch"])
        keeps = self.rungs.judge(trial_task(trial.config), trial.trial_id, epoch, result.get("val_acc"),
                                 _costs(result))
        if not keeps:
            result[STOPPED_AT] = epoch  # Tune keeps the callbacks' changes in the trial's last result
        tell(result[RUNG_DECISION], keeps)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result
        if result.get(COMPLETE) and not is_reference(trial.config):  # reference points never stop a trial
            self.rungs.finish(trial_task(trial.config), trial.trial_id, float(result["val_acc"]), _costs(result))

    def get_state(self) -> dict[str, Any]:
        return self.rungs.state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.rungs.load_state(state)


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, telling a stopped trial to its study as PRUNED (with its last accuracy and
    epoch as user attributes) instead of COMPLETE: a stopped trial's accuracy is not its final one, and
    Optuna's samplers treat pruned trials as the worse ones. The study names its objectives, and each
    Optuna trial carries vpt-tune's trial id and its MLflow run id (user attributes ``trial_id``,
    ``mlflow_run_id``), so optuna-dashboard links to the trial table and MLflow."""

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, unchanged since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(self._metric))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # OptunaSearch's own record of the Optuna trial it asked
            self._ot_trials[trial_id].set_user_attr("trial_id", trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get(MLFLOW_RUN_ID) and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(MLFLOW_RUN_ID, result[MLFLOW_RUN_ID])
        if result and result.get(STOPPED_AT) and not error:
            trial = self._ot_trials[trial_id]
            trial.set_user_attr(STOPPED_AT, int(result[STOPPED_AT]))
            trial.set_user_attr("val_acc", result.get("val_acc"))
            result = None  # OptunaSearch tells a trial without values as PRUNED
        super().on_trial_complete(trial_id, result, error)
