"""Early-stopping decisions on constructed results (no Ray): rungs, Pareto ranks, the known-cost rule."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from vpt_tune.search.pareto import crowding_distance, nondominated_ranks
from vpt_tune.search.scheduler import Rungs, dominated_by_finished, pareto_rank_keeps
from vpt_tune.spec import SpecError, rung_epochs, validate

CHEAP, DEAR = (2.0, 1.0), (8.0, 1.2)  # (prompt_tokens, gflops)


def test_rungs_sit_at_min_epochs_times_powers_of_the_reduction_factor_before_the_last_epoch():
    assert rung_epochs(1, 3, 9) == [1, 3]
    assert rung_epochs(10, 3, 100) == [10, 30, 90]
    assert rung_epochs(1, 2, 2) == [1]
    assert rung_epochs(5, 3, 5) == []
    assert Rungs("off", 1, 3, 9).rungs == []


def test_nondominated_ranks_and_crowding_distance():
    costs = np.array([[0, 3], [1, 1], [3, 0], [2, 2], [3, 3]], dtype=float)
    assert nondominated_ranks(costs).tolist() == [0, 0, 0, 1, 2]
    front = costs[:3]
    distance = crowding_distance(front)
    assert np.isinf(distance[[0, 2]]).all()  # the extremes of each objective
    assert distance[1] == pytest.approx((3 - 0) / 3 + (3 - 0) / 3)


def test_only_the_top_third_at_a_rung_continues_and_ties_continue():
    rungs = Rungs("mo_asha", 1, 3, 9)
    decisions = [rungs.judge("t", name, 1, acc, CHEAP)
                 for name, acc in [("a", 0.5), ("b", 0.6), ("c", 0.7), ("d", 0.4), ("e", 0.55), ("f", 0.65)]]
    # d: 3 of 4 ahead (keep 2); e: 2 of 5 ahead (keep 2); f: only c ahead (keep 2).
    assert decisions == [True, True, True, False, False, True]
    assert rungs.stopped == {"d": 1, "e": 1}
    assert rungs.judge("t", "g", 1, 0.7, CHEAP)  # ties with the best: nobody strictly ahead
    assert rungs.judge("t", "a", 2, 0.1, CHEAP)  # epoch 2 is no rung: nothing is judged there
    assert not rungs.judge("t", "d", 2, 0.9, CHEAP)  # a stopped trial stays stopped


def test_a_dominated_trial_stops_and_a_cheap_one_survives():
    rungs = Rungs("mo_asha", 1, 3, 9)
    assert rungs.judge("t", "accurate", 1, 0.9, DEAR)
    assert not rungs.judge("t", "dominated", 1, 0.8, DEAR)
    assert rungs.judge("t", "cheap", 1, 0.3, CHEAP)  # worst accuracy, but nothing is as cheap: a front extreme
    # Rung records are per task: another task's first trial continues whatever it scores.
    assert rungs.judge("other", "x", 1, 0.0, DEAR)


def test_a_diverged_trial_ranks_last():
    assert not pareto_rank_keeps([(0.2, *DEAR), (float("nan"), *DEAR)], 1, 3)
    assert not pareto_rank_keeps([(0.2, *DEAR), (None, *DEAR)], 1, 3)
    assert pareto_rank_keeps([(0.2, *DEAR), (None, *DEAR)], 0, 3)


def _with_a_finished_trial(rule: str) -> Rungs:
    """Task t: trial F reached rung 1 at 0.80 and finished at 0.95 at the cheap cost (gain 0.15); four
    poor trials reached rung 1 at the dear cost."""
    rungs = Rungs(rule, 1, 3, 9)
    assert rungs.judge("t", "F", 1, 0.80, CHEAP)
    for i, acc in enumerate([0.20, 0.25, 0.30, 0.35]):
        rungs.judge("t", f"poor{i}", 1, acc, DEAR)
    rungs.finish("t", "F", 0.95, CHEAP)
    return rungs


def test_known_cost_rule_stops_a_trial_a_finished_cheaper_one_beats_even_optimistically():
    # 0.70 + the largest gain 0.15 = 0.85 < 0.95 of F, which costs less: hopeless. MO-ASHA alone keeps
    # it (only F's rung result is ahead of it among 6, and 2 continue).
    assert not _with_a_finished_trial("known_cost").judge("t", "T", 1, 0.70, DEAR)
    assert _with_a_finished_trial("mo_asha").judge("t", "T", 1, 0.70, DEAR)
    # It does not fire when the optimistic estimate (0.82 + 0.15) beats F ...
    assert _with_a_finished_trial("known_cost").judge("t", "T", 1, 0.82, DEAR)
    # ... nor for a trial cheaper than every finished one, however inaccurate ...
    assert _with_a_finished_trial("known_cost").judge("t", "T", 1, 0.05, (1.0, 0.9))
    # ... nor before any finished trial has reported this rung (no gain to estimate with).
    rungs = _with_a_finished_trial("known_cost")
    rungs.epochs = 30  # rungs 1, 3, 9, 27: F never reported rung 3
    assert rungs.judge("t", "T", 3, 0.1, DEAR)


def test_dominated_by_finished_needs_no_greater_cost_and_strict_dominance():
    finished = [(0.9, 4.0, 1.0)]
    assert dominated_by_finished(0.8, (4.0, 1.0), finished)
    assert not dominated_by_finished(0.9, (4.0, 1.0), finished)  # equal in every objective: not dominated
    assert dominated_by_finished(0.9, (5.0, 1.0), finished)
    assert not dominated_by_finished(0.5, (3.0, 1.5), finished)  # fewer tokens than the finished trial


def test_decisions_are_made_once_per_trial_and_rung_and_survive_a_save():
    rungs = Rungs("known_cost", 1, 3, 9)
    assert rungs.judge("t", "a", 1, 0.9, CHEAP)
    assert not rungs.judge("t", "b", 1, 0.1, CHEAP)
    assert not rungs.judge("t", "b", 1, 0.95, CHEAP)  # reported again after a restart: same answer
    assert list(rungs.records["t"][1]) == ["a", "b"] and rungs.records["t"][1]["b"][0] == 0.1
    restored = Rungs("known_cost", 1, 3, 9)
    restored.load_state(pickle.loads(pickle.dumps(rungs.state())))
    for judge in (rungs, restored):  # the same next decisions
        assert [judge.judge("t", n, 1, acc, CHEAP) for n, acc in [("c", 0.5), ("d", 0.95)]] == [False, True]


def test_the_spec_refuses_rungs_that_never_come(tmp_path):
    raw = {"name": "x", "space": {"num_prompts": {"int": [1, 4]}}, "train": {"epochs": 2},
           "search": {"early_stopping": {"rule": "mo_asha", "min_epochs": 2}}}
    with pytest.raises(SpecError, match="search.early_stopping.min_epochs: 2 leaves no rung"):
        validate(raw)
    raw["search"]["early_stopping"] = {"rule": "known_cost", "reduction_factor": 1}
    with pytest.raises(SpecError, match="reduction_factor"):
        validate(raw)
    raw["search"]["early_stopping"] = {"rule": "asha"}
    with pytest.raises(SpecError, match="rule"):
        validate(raw)
    raw["search"]["early_stopping"] = {"rule": True}
    with pytest.raises(SpecError, match="rule"):
        validate(raw)


def test_rule_off_may_be_written_bare_in_yaml(tmp_path):
    """YAML reads a bare ``off`` as false: the spec still means the rule ``off`` (and --set works too)."""
    from vpt_tune.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nspace: {num_prompts: {int: [1, 4]}}\ntrain: {epochs: 3}\n"
                    "search: {early_stopping: {rule: off}}\n")
    assert load_spec(path).search.early_stopping.rule == "off"
    assert load_spec("demo_asha", ["search.early_stopping.rule=off"]).search.early_stopping.rule == "off"


def test_the_tune_callback_judges_rung_reports_tells_the_workers_and_learns_from_complete_trials(tmp_path):
    """Only a rung report (one naming a decision file) is judged, and its decision is written there; a stopped
    trial's rung result is marked; a trial whose last report is ``trial_complete`` becomes a finished trial."""
    from types import SimpleNamespace

    from vpt_tune.search.results import STOPPED_AT
    from vpt_tune.search.scheduler import RungJudge
    from vpt_tune.train.rung_decision import RUNG_DECISION, await_decision, decision_file
    from vpt_tune.train.worker import COMPLETE

    judge = RungJudge(Rungs("known_cost", 1, 3, 9))
    good, poor = (SimpleNamespace(trial_id=name, config={"task": "t"}, last_result={}) for name in ("good", "poor"))

    def result(trial, epoch, acc, rung=True, **extra):
        report = {"epoch": epoch, "val_acc": acc, "prompt_tokens": 2.0, "gflops": 1.0, **extra}
        if rung:
            report[RUNG_DECISION] = str(decision_file(tmp_path / trial.trial_id, epoch))
        judge.on_trial_result(0, [], trial, report)
        trial.last_result = report
        return report

    for epoch in (1, 3):
        assert STOPPED_AT not in result(good, epoch, 0.9) and await_decision(tmp_path / "good" / f"epoch-{epoch}")
    for epoch in (2, 9, 10, 29):  # no decision file named: not judged (a condensation epoch, say), none written
        result(good, epoch, 0.1, rung=False)
    assert set(judge.rungs.records["t"]) == {1, 3} and sorted(p.name for p in (tmp_path / "good").iterdir()) == \
        ["epoch-1", "epoch-3"]
    result(good, 29, 0.95, rung=False, **{COMPLETE: True})
    judge.on_trial_complete(0, [], good)
    assert judge.rungs.finished == {"t": {"good": (0.95, 2.0, 1.0)}}

    assert result(poor, 1, 0.1)[STOPPED_AT] == 1  # dominated by good's 0.9 at the same cost
    assert not await_decision(tmp_path / "poor" / "epoch-1")
    judge.on_trial_complete(0, [], poor)  # stopped: not a finished trial
    assert list(judge.rungs.finished["t"]) == ["good"]
    assert result(poor, 1, 0.99)[STOPPED_AT] == 1  # reported again (a restarted worker group): the same answer
    assert judge.get_state()["stopped"] == {"poor": 1}


def test_a_worker_waits_for_its_decision_and_gives_up_with_a_clear_error(tmp_path):
    import threading

    from vpt_tune.train.rung_decision import await_decision, decision_file, tell

    path = decision_file(tmp_path / "attempt", 3)
    threading.Timer(0.3, tell, (path, False)).start()
    assert await_decision(path, timeout=30) is False  # waited for it
    tell(path, True)  # rewritten whole (atomically): the last word counts
    assert await_decision(path) is True and [p.name for p in path.parent.iterdir()] == ["epoch-3"]
    with pytest.raises(TimeoutError, match=r"no early-stopping decision in .*epoch-1 after 0 s"):
        await_decision(decision_file(tmp_path / "attempt", 1), timeout=0.2)


def test_builtin_specs_stop_early_where_the_schedule_is_long(monkeypatch):
    from vpt_tune.spec import load_spec

    monkeypatch.setenv("VTAB_ROOT", "/data/vtab-1k")
    monkeypatch.setenv("FGVC_ROOT", "/data/fgvc")
    for name in ("vtab_pc", "fgvc_pc", "e2vpt"):
        spec = load_spec(name)
        stopping = spec.search.early_stopping
        assert stopping.rule == "known_cost", name
        assert rung_epochs(stopping.min_epochs, stopping.reduction_factor, spec.train.epochs) == [10, 30, 90]
    asha = load_spec("demo_asha").search.early_stopping
    assert (asha.rule, rung_epochs(asha.min_epochs, asha.reduction_factor, load_spec("demo_asha").train.epochs)) == \
        ("known_cost", [1, 3])
    assert load_spec("demo").search.early_stopping.rule == "off" and load_spec("demo").train.epochs == 2
