"""Pareto fronts of finished trials: non-dominated sets and front figures (a small plotly page, PNG)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from vpt_tune.search.results import short_config
from vpt_tune.spec import OBJECTIVES


def pareto_mask(table: pd.DataFrame, objectives: dict[str, str] = OBJECTIVES) -> np.ndarray:
    """Boolean mask of the rows of ``table`` that no other row dominates.

    ``objectives`` maps column -> "max" | "min". Written here because Optuna's non-dominated sort is
    private API and works on its own trial objects, not on a table of results.
    """
    if table.empty:
        return np.zeros(0, dtype=bool)
    signs = np.array([1.0 if mode == "min" else -1.0 for mode in objectives.values()])
    costs = table[list(objectives)].to_numpy(dtype=float) * signs  # all minimised
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)  # [i, j]: i is no worse than j
    better = (costs[:, None, :] < costs[None, :, :]).any(axis=2)
    dominated = (no_worse & better).any(axis=0)
    return ~dominated


def nondominated_ranks(costs: np.ndarray) -> np.ndarray:
    """Front index of each row of ``costs`` (n x d, every column minimised): 0 for the rows nothing
    dominates, 1 for those only front 0 dominates, and so on (NSGA-II's non-dominated sorting)."""
    costs = np.asarray(costs, dtype=float)
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)
    dominates = no_worse & (costs[:, None, :] < costs[None, :, :]).any(axis=2)  # [i, j]: i dominates j
    ranks = np.full(len(costs), -1)
    left, front = np.ones(len(costs), dtype=bool), 0
    while left.any():
        current = left & ~(dominates & left[:, None]).any(axis=0)
        ranks[current] = front
        left &= ~current
        front += 1
    return ranks


def crowding_distance(costs: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row of one front (n x d): per objective, the gap between its
    two neighbours over the front's range, summed; the extremes of each objective get infinity."""
    costs = np.asarray(costs, dtype=float)
    distance = np.zeros(len(costs))
    for column in costs.T:
        order = np.argsort(column, kind="stable")
        distance[order[[0, -1]]] = np.inf
        span = column[order[-1]] - column[order[0]]
        if span > 0 and len(costs) > 2:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


# Markers of the reference points (linear probe, SSF, full fine-tuning...), in the order they are listed
REFERENCE_SYMBOLS = (("square", "s"), ("diamond", "D"), ("star", "*"), ("triangle-up", "^"))


def _by_reference(references: pd.DataFrame | None) -> list[tuple[str, pd.DataFrame, tuple[str, str]]]:
    """(name, rows, (plotly symbol, matplotlib marker)) of each reference method among ``references``."""
    if references is None or references.empty:
        return []
    names = list(dict.fromkeys(references["reference"]))
    return [(name, references[references["reference"] == name], REFERENCE_SYMBOLS[i % len(REFERENCE_SYMBOLS)])
            for i, name in enumerate(names)]


def front_figure(table: pd.DataFrame, cost: str, title: str, accuracy: str = "val_acc",
                 references: pd.DataFrame | None = None):
    """Interactive plotly scatter of ``accuracy`` vs ``cost``: the 2-D front joined by its steps, dominated
    points lighter but readable, each reference point (``references``: linear probe, SSF, full fine-tuning)
    with its own marker, and a note that the plot projects a 3-objective front.

    Hovering a point shows its trial id, its three objectives and its config, one per line.
    """
    import plotly.graph_objects as go

    front2d = pareto_mask(table, {accuracy: "max", cost: "min"})
    fig = go.Figure()
    for on_front, name, opacity in ((False, "dominated", 0.5), (True, "Pareto front", 1.0)):
        part = table[front2d == on_front].sort_values(cost)
        fig.add_trace(go.Scatter(
            x=part[cost], y=part[accuracy], name=name, opacity=opacity, mode="lines+markers" if on_front else "markers",
            line={"shape": "hv"}, text=[_hover(row, accuracy) for row in part.to_dict("records")],
            hovertemplate="%{text}<extra></extra>",
        ))
    for name, rows, (symbol, _) in _by_reference(references):
        fig.add_trace(go.Scatter(
            x=rows[cost], y=rows[accuracy], name=name, mode="markers", marker={"symbol": symbol, "size": 12},
            text=[_hover(row, accuracy) for row in rows.to_dict("records")], hovertemplate="%{text}<extra></extra>",
        ))
    others = " and ".join(c for c in OBJECTIVES if c not in (accuracy, cost, "val_acc"))
    fig.add_annotation(  # the table's `pareto` flag is the 3-objective front: a point can be on it but not here
        text=f"a 2-D view of a 3-objective front: a point dominated here may be optimal in {others}",
        xref="paper", yref="paper", x=0, y=-0.22, showarrow=False, font={"size": 11, "color": "grey"})
    fig.update_layout(title=title, xaxis_title=cost, yaxis_title=accuracy, template="plotly_white",
                      hoverlabel={"align": "left"}, margin={"b": 90})
    return fig


def front_page(table: pd.DataFrame, costs: tuple[str, ...], title: str, accuracy: str,
               plotly_sources: list[tuple[str, str]], references: pd.DataFrame | None = None) -> str:
    """One HTML page with the ``accuracy``-vs-cost front of each of ``costs``, without plotly.js: it loads
    plotly.js once, from the first of ``plotly_sources`` that answers, so the page stays a few KB (plotly.js
    is 4.6 MB) and works offline.

    A source is ``("server", path)``, resolved against the MLflow server that shows the page (its UI puts an
    HTML artifact in a sandboxed ``blob:`` iframe, where relative URLs do not resolve), or ``("page", path)``,
    relative to the page's own URL (a file opened from the artifact store). When none loads, the page says so.
    """
    import plotly.io

    figures = [json.loads(plotly.io.to_json(
        front_figure(table, cost, f"{title}: {accuracy} vs {cost}", accuracy, references), validate=False))
        for cost in costs]
    data = json.dumps({"figures": figures, "sources": plotly_sources}).replace("<", "\\u003c")  # stays in its <script>
    return _PAGE.replace("$TITLE", html.escape(f"{title}: {accuracy} fronts")).replace("$DATA", data)


# Written by hand: plotly's own HTML either embeds plotly.js (4.6 MB a page) or loads it from a CDN or a
# fixed relative path, none of which works inside MLflow's sandboxed blob: iframe without internet.
_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>$TITLE</title>
<style>body{margin:0;font-family:sans-serif}.front{height:480px}#missing{display:none;margin:1em;color:#a00}</style>
</head><body>
<p id="missing">plotly.js could not be loaded: open this page from MLflow's UI, or put plotly.min.js
(<code>python -c "import plotly, os; print(os.path.dirname(plotly.__file__))"</code>, under
<code>package_data</code>) beside it.</p>
<div id="fronts"></div>
<script id="data" type="application/json">$DATA</script>
<script>
(function () {
  var data = JSON.parse(document.getElementById("data").textContent);
  function resolve(source) {  // null when this kind of source has no base here
    try {
      if (source[0] === "page") return new URL(source[1], location.href).href;
      var root = document.referrer || (location.protocol === "blob:" ? new URL(location.pathname).origin + "/" : "");
      return root ? new URL(source[1], root).href : null;
    } catch (e) { return null; }
  }
  var urls = data.sources.map(resolve).filter(Boolean);
  function draw() {
    data.figures.forEach(function (figure) {
      var div = document.createElement("div");
      div.className = "front";
      document.getElementById("fronts").appendChild(div);
      Plotly.newPlot(div, figure.data, figure.layout, {responsive: true});
    });
  }
  function load(i) {
    if (window.Plotly) return draw();
    if (i >= urls.length) { document.getElementById("missing").style.display = "block"; return; }
    var script = document.createElement("script");
    script.src = urls[i];
    script.onload = function () { load(i + 1); };
    script.onerror = function () { load(i + 1); };
    document.head.appendChild(script);
  }
  load(0);
})();
</script>
</body></html>
"""


def _hover(row: dict, accuracy: str) -> str:
    """A point's hover text: trial id, the three objectives and the config, a line each."""
    lines = [f"trial {row['trial_id']}", f"{accuracy} {row[accuracy]:.3f}",
             f"prompt tokens {row['prompt_tokens']:.4g}", f"GFLOPs {row['gflops']:.3f}",
             *short_config(json.loads(row["config"])).split(" · ")]
    return "<br>".join(lines)


def front_png(table: pd.DataFrame, cost: str, title: str, path: Path, accuracy: str = "val_acc",
              references: pd.DataFrame | None = None) -> None:
    """Static PNG of the same front (matplotlib: plotly's PNG export needs a browser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front2d = pareto_mask(table, {accuracy: "max", cost: "min"})
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter(table[cost][~front2d], table[accuracy][~front2d], color="grey", alpha=0.4, label="dominated")
    front = table[front2d].sort_values(cost)
    ax.step(front[cost], front[accuracy], where="post", marker="o", color="tab:red", label="Pareto front")
    for name, rows, (_, marker) in _by_reference(references):
        ax.scatter(rows[cost], rows[accuracy], marker=marker, s=70, label=name)
    ax.set(xlabel=cost, ylabel=accuracy, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
