"""Exact hypervolume: hand-computed cases, brute force on random sets, reference point, history."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from vpt_tune.search.hypervolume import hypervolume, hypervolume_history, reference_point

MIN2 = {"a": "min", "b": "min"}
MIN3 = {"a": "min", "b": "min", "c": "min"}


def table(points, names="abc") -> pd.DataFrame:
    points = np.asarray(points, dtype=float)
    return pd.DataFrame(points, columns=list(names[: points.shape[1]]))


def ref(*values, names="abc") -> dict[str, float]:
    return dict(zip(names, values))


def grid_volume(points: np.ndarray, reference: np.ndarray) -> float:
    """Brute force: the cells between consecutive distinct coordinates are each wholly dominated or not."""
    axes = [np.unique(np.append(points[:, d], reference[d])) for d in range(points.shape[1])]
    axes = [axis[axis <= r] for axis, r in zip(axes, reference)]
    total = 0.0
    for cell in itertools.product(*(range(len(axis) - 1) for axis in axes)):
        low = np.array([axis[i] for axis, i in zip(axes, cell)])
        if (points <= low).all(axis=1).any():
            total += np.prod([axis[i + 1] - axis[i] for axis, i in zip(axes, cell)])
    return total


def inclusion_exclusion(points: np.ndarray, reference: np.ndarray) -> float:
    """Brute force: the union of the boxes [p, ref] by inclusion-exclusion over all subsets."""
    inside = points[(points < reference).all(axis=1)]
    total = 0.0
    for size in range(1, len(inside) + 1):
        for subset in itertools.combinations(inside, size):
            total += (-1) ** (size + 1) * np.prod(reference - np.max(subset, axis=0))
    return total


def test_2d_staircase_by_hand():
    # min/min: steps (1,3), (2,2), (3,1) under (4,4): 3*1 + 2*1 + 1*1
    assert hypervolume(table([[1, 3], [2, 2], [3, 1]]), ref(4, 4), MIN2) == pytest.approx(6.0)
    # a max objective is negated: accuracy 0.9/0.8/0.7 at cost 3/2/1 against (0.6, 4)
    acc = pd.DataFrame({"acc": [0.9, 0.8, 0.7], "cost": [3, 2, 1]})
    assert hypervolume(acc, {"acc": 0.6, "cost": 4}, {"acc": "max", "cost": "min"}) == pytest.approx(0.6)


def test_3d_by_hand():
    # boxes 3*3*1 = 9 and 2*2*3 = 12 overlap in 2*2*1 = 4
    assert hypervolume(table([[1, 1, 3], [2, 2, 1]]), ref(4, 4, 4), MIN3) == pytest.approx(17.0)
    # the project's objectives: accuracy max, tokens and GFLOPs min
    row = pd.DataFrame({"val_acc": [0.9], "prompt_tokens": [2.0], "gflops": [1.5]})
    reference = {"val_acc": 0.5, "prompt_tokens": 10.0, "gflops": 2.0}
    assert hypervolume(row, reference) == pytest.approx(0.4 * 8 * 0.5)


def test_dominated_and_duplicate_points_add_nothing():
    base = [[1, 1, 3], [2, 2, 1]]
    more = base + [[3, 3, 3], [2, 2, 1], [1, 1, 3.5], [2, 2, 2]]  # dominated or repeated
    assert hypervolume(table(more), ref(4, 4, 4), MIN3) == pytest.approx(17.0)


def test_points_outside_the_reference_add_nothing():
    base = [[1, 3], [2, 2]]
    outside = base + [[0, 5], [5, 0], [0, 4], [4, 0], [np.nan, 0]]  # beyond, on the boundary, missing
    assert hypervolume(table(outside), ref(4, 4), MIN2) == pytest.approx(hypervolume(table(base), ref(4, 4), MIN2))
    assert hypervolume(table([[5, 5]]), ref(4, 4), MIN2) == 0.0
    assert hypervolume(table(np.zeros((0, 2))), ref(4, 4), MIN2) == 0.0


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", range(15))
def test_random_sets_match_brute_force(dims, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    # integer coordinates force ties between points; some fall outside the reference
    points = rng.integers(0, 6, size=(n, dims)).astype(float) if seed % 2 else rng.random((n, dims)) * 5
    reference = np.full(dims, 4.5)
    objectives = MIN3 if dims == 3 else MIN2
    got = hypervolume(table(points), ref(*reference), objectives)
    assert got == pytest.approx(inclusion_exclusion(points, reference))
    assert got == pytest.approx(grid_volume(points, reference))


@pytest.mark.parametrize("dims", [2, 3])
def test_matches_optuna_private_implementation(dims):
    hv = pytest.importorskip("optuna._hypervolume")  # private API: a cross-check only
    rng = np.random.default_rng(dims)
    points, reference = rng.random((60, dims)), np.full(dims, 1.1)
    expected = hv.compute_hypervolume(points, reference)
    assert hypervolume(table(points), ref(*reference), MIN3 if dims == 3 else MIN2) == pytest.approx(expected)


def test_mixed_directions_match_brute_force():
    rng = np.random.default_rng(7)
    trials = pd.DataFrame({"val_acc": rng.random(7), "prompt_tokens": rng.integers(1, 20, 7), "gflops": rng.random(7)})
    reference = reference_point(trials)
    costs = trials.to_numpy(dtype=float) * [-1, 1, 1]
    corner = np.array([-reference["val_acc"], reference["prompt_tokens"], reference["gflops"]])
    assert hypervolume(trials, reference) == pytest.approx(inclusion_exclusion(costs, corner))


def test_reference_point_is_the_worst_value_plus_a_tenth_of_the_range():
    trials = pd.DataFrame({"val_acc": [0.5, 0.9, np.nan], "prompt_tokens": [4.0, 4.0, 4.0], "gflops": [1.0, 3.0, 2.0]})
    assert reference_point(trials) == pytest.approx({"val_acc": 0.46, "prompt_tokens": 4.4, "gflops": 3.2})
    finite = trials.dropna()
    for i in range(len(finite)):  # every row lies strictly inside: each adds volume
        assert hypervolume(finite.iloc[[i]], reference_point(trials)) > 0
    with pytest.raises(ValueError, match="val_acc"):
        reference_point(trials.assign(val_acc=np.nan))


def test_history_is_monotone_and_ends_at_the_total():
    rng = np.random.default_rng(3)
    trials = pd.DataFrame({
        "number": rng.permutation(30), "val_acc": rng.random(30), "prompt_tokens": rng.integers(1, 50, 30),
        "gflops": rng.random(30) + 1,
    })
    reference = reference_point(trials)
    history = hypervolume_history(trials, reference, "number")
    assert list(history.index) == list(range(30))
    assert (np.diff(history.to_numpy()) >= 0).all()
    assert history.iloc[-1] == pytest.approx(hypervolume(trials, reference))
    assert history.iloc[0] == pytest.approx(hypervolume(trials[trials["number"] == 0], reference))
