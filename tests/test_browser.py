"""The Pareto-front HTML that ``Tracker.log_fronts`` writes, rendered in headless Chromium.

Chromium dumps the DOM after plotly.js has drawn the figure; the test counts the SVG markers of each
trace. Skipped only when no Chromium binary is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest

from vpt_tune.search.pareto import front_figure, pareto_mask

from conftest import require

pytestmark = pytest.mark.slow  # headless Chromium

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
# (val_acc, prompt_tokens, gflops), all distinct points. On the val_acc (max) / gflops (min) front:
# t0 (cheapest), t2, t5 (most accurate); t1, t3, t4, t6 are each dominated by one of them.
ROWS = [
    (0.70, 4, 2.0),   # t0 front
    (0.65, 8, 2.5),   # t1 dominated by t0
    (0.80, 10, 3.0),  # t2 front
    (0.75, 6, 3.5),   # t3 dominated by t2
    (0.78, 20, 4.5),  # t4 dominated by t2
    (0.90, 16, 5.0),  # t5 front
    (0.85, 12, 6.0),  # t6 dominated by t5
]
ON_FRONT = 3


class _Node:
    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag, self.attrs, self.children = tag, attrs, []

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    @property
    def style(self) -> dict[str, str]:
        pairs = (part.split(":", 1) for part in (self.attrs.get("style") or "").split(";") if ":" in part)
        return {key.strip(): value.strip() for key, value in pairs}

    def find_all(self, tag: str, cls: str) -> list[_Node]:
        """Descendants (pre-order) with tag ``tag`` and class ``cls``."""
        found = []
        for child in self.children:
            if child.tag == tag and cls in child.classes:
                found.append(child)
            found.extend(child.find_all(tag, cls))
        return found


class _Tree(HTMLParser):
    """The dumped DOM as a tree of ``_Node`` (Chromium serialises every SVG element with an end tag)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = _Node("#document", {})
        self.stack = [self.root]
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, {key: value or "" for key, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(_Node(tag, {key: value or "" for key, value in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return


def _chromium() -> str:
    path = next(filter(None, map(shutil.which, BROWSERS)), None)
    require(path is not None, "Chromium (apt-get install chromium)")
    return path


def _trials() -> pd.DataFrame:
    table = pd.DataFrame(ROWS, columns=["val_acc", "prompt_tokens", "gflops"])
    table["trial_id"] = [f"t{i}" for i in range(len(table))]
    table["config"] = [json.dumps({"num_prompts": int(tokens), "lr": 0.01 * (i + 1)})
                       for i, tokens in enumerate(table["prompt_tokens"])]
    table["status"] = "finished"
    return table


def _fill(node: _Node) -> str:
    return node.style.get("fill", "")


def test_front_html_renders_expected_points(tmp_path):
    browser = _chromium()
    table = _trials()
    front = pareto_mask(table, {"val_acc": "max", "gflops": "min"})
    assert int(front.sum()) == ON_FRONT

    # as Tracker.log_fronts writes it (its finished-trials filter keeps all 7 rows here)
    title, accuracy, cost = "synthetic", "val_acc", "gflops"
    finished = table[(table["status"] == "finished") & table[accuracy].notna()]
    html = tmp_path / f"front_{accuracy}_vs_{cost}.html"
    front_figure(finished, cost, f"{title}: {accuracy} vs {cost}", accuracy).write_html(html, include_plotlyjs=True)

    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _Tree(done.stdout).root

    traces = dom.find_all("g", "trace")
    assert traces, f"plotly drew no traces; chromium stderr:\n{done.stderr[-2000:]}"
    assert all("scatter" in trace.classes for trace in traces)
    # name each drawn trace by its legend entry: same marker colour
    legend = {}
    for entry in dom.find_all("g", "traces"):
        (name,) = [text.attrs["data-unformatted"] for text in entry.find_all("text", "legendtext")]
        (symbol,) = entry.find_all("path", "scatterpts")
        legend[_fill(symbol)] = name
    points = {}
    for trace in traces:
        markers = trace.find_all("path", "point")
        assert markers and len({_fill(marker) for marker in markers}) == 1
        points[legend[_fill(markers[0])]] = (trace, markers)
    assert sorted(points) == ["Pareto front", "dominated"]

    front_trace, front_points = points["Pareto front"]
    dominated_trace, dominated_points = points["dominated"]
    assert len(front_points) == ON_FRONT
    assert len(dominated_points) == len(ROWS) - ON_FRONT
    assert len(front_points) + len(dominated_points) == len(ROWS)
    # the dominated trace is faded, the front is not and is joined by its step line
    assert float(dominated_trace.style["opacity"]) == pytest.approx(0.5)
    assert float(front_trace.style["opacity"]) == pytest.approx(1.0)
    assert len(front_trace.find_all("path", "js-line")) == 1
    assert not dominated_trace.find_all("path", "js-line")
    # front markers, sorted by cost, go right and up (SVG y grows downwards)
    xy = [tuple(map(float, m.attrs["transform"].removeprefix("translate(").rstrip(")").split(",")))
          for m in front_points]
    assert [x for x, _ in xy] == sorted(x for x, _ in xy)
    assert [y for _, y in xy] == sorted((y for _, y in xy), reverse=True)
