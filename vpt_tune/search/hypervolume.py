"""Exact hypervolume of a trial table's objectives, a default reference point and the HV history.

Written here because Optuna has no public hypervolume function: only a plot over a Study
(``optuna.visualization.plot_hypervolume_history``); its computation lives in the private
``optuna._hypervolume`` and works on loss arrays, not on a table of results.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vpt_tune.spec import OBJECTIVES


def _costs(values: np.ndarray, objectives: dict[str, str]) -> np.ndarray:
    """``values`` (columns in ``objectives`` order) with max objectives negated: everything minimised."""
    signs = np.array([-1.0 if mode == "max" else 1.0 for mode in objectives.values()])
    return np.asarray(values, dtype=float) * signs


def _area(points: np.ndarray, ref: np.ndarray) -> float:
    """2-D: the staircase area dominated by ``points`` (all strictly inside ``ref``), swept along x."""
    area, floor = 0.0, ref[1]
    for x, y in points[np.lexsort((points[:, 1], points[:, 0]))]:
        if y < floor:  # the new step: [x, ref_x] x [y, floor]
            area += (ref[0] - x) * (floor - y)
            floor = y
    return area


def _volume(points: np.ndarray, ref: np.ndarray) -> float:
    """d >= 2: slabs between consecutive values of the last objective, each the volume of the
    points at or below it in the remaining objectives times its thickness."""
    if points.shape[1] == 2:
        return _area(points, ref)
    points = points[np.argsort(points[:, -1], kind="stable")]
    bounds = np.append(points[:, -1], ref[-1])
    return sum(
        _volume(points[: i + 1, :-1], ref[:-1]) * (bounds[i + 1] - bounds[i])
        for i in range(len(points)) if bounds[i + 1] > bounds[i]
    )


def hypervolume(table: pd.DataFrame, reference: dict[str, float], objectives: dict[str, str] = OBJECTIVES) -> float:
    """Exact volume dominated by the rows of ``table`` and bounded by ``reference``.

    ``objectives`` maps column -> "max" | "min": 2 or 3 of them (the slicing is exact for more, but
    its cost grows as n^(d-1) log n).
    Rows not strictly better than the reference in every objective, or with a missing value (a
    failed trial), add nothing.
    """
    if len(objectives) < 2:
        raise ValueError(f"hypervolume needs at least 2 objectives, got {list(objectives)}")
    ref = _costs([reference[name] for name in objectives], objectives)
    costs = _costs(table[list(objectives)].to_numpy(dtype=float), objectives)
    inside = costs[(costs < ref).all(axis=1)]  # NaN compares False: dropped too
    return float(_volume(inside, ref)) if len(inside) else 0.0


def reference_point(table: pd.DataFrame, objectives: dict[str, str] = OBJECTIVES) -> dict[str, float]:
    """The worst value of each objective in ``table``, moved 10 % of its range further out.

    The usual "nadir plus a margin" rule: every row, even the worst in one objective, then adds
    volume, and no objective needs a known bound. A fixed val_acc reference of 0 would also do, but
    most of the volume would then come from accuracy that every trial reaches, hiding the differences
    that matter. A constant objective is moved by 10 % of its value (0.1 if it is 0).
    Hypervolumes are comparable only under the same reference: compute it once, from the largest table.
    """
    reference = {}
    for name, mode in objectives.items():
        values = table[name].dropna()
        if values.empty:
            raise ValueError(f"no values of {name!r} to place the reference point")
        worst = values.min() if mode == "max" else values.max()
        margin = 0.1 * ((values.max() - values.min()) or abs(worst) or 1.0)
        reference[name] = float(worst - margin if mode == "max" else worst + margin)
    return reference


def box_volume(table: pd.DataFrame, reference: dict[str, float], objectives: dict[str, str] = OBJECTIVES) -> float:
    """The volume of the box between ``reference`` and the ideal point of ``table`` (the best value of
    each objective among its rows): the largest hypervolume its rows could have. Dividing by it puts a
    hypervolume in [0, 1] whatever the objectives' units, so tasks and searches compare (under the
    nadir + 10 % reference one point alone gives 1/1.1^d)."""
    ideal = {name: table[name].max() if mode == "max" else table[name].min() for name, mode in objectives.items()}
    return float(np.prod([abs(reference[name] - ideal[name]) for name in objectives]))


def hypervolume_history(
    table: pd.DataFrame, reference: dict[str, float], order_column: str, objectives: dict[str, str] = OBJECTIVES,
) -> pd.Series:
    """The hypervolume of the first k rows in ``order_column`` order, for every k (non-decreasing).

    Pass the finished trials; indexed by ``order_column``'s values.
    """
    ordered = table.sort_values(order_column, kind="stable")
    values = [hypervolume(ordered.iloc[: k + 1], reference, objectives) for k in range(len(ordered))]
    return pd.Series(values, index=ordered[order_column].to_numpy(), name="hypervolume", dtype=float)
