"""The Pareto fronts as users see them, in headless Chromium: the front page that ``Tracker.log_fronts``
writes, opened as a file, and a finished search in MLflow's own UI served by ``mlflow server``.

Chromium dumps the DOM after plotly.js has drawn the figures (or Playwright reads it, inside MLflow's
iframe); the tests count the SVG markers of each trace. Skipped only when no Chromium is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from vpt_tune.search.pareto import front_page, pareto_mask

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


def _dump(browser: str, url: str, profile) -> _Node:
    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return _Tree(done.stdout).root


def _write_plotly(path) -> None:
    from plotly.offline import get_plotlyjs

    path.write_text(get_plotlyjs(), encoding="utf-8")


def test_front_page_renders_expected_points(tmp_path):
    browser = _chromium()
    table = _trials()
    front = pareto_mask(table, {"val_acc": "max", "gflops": "min"})
    assert int(front.sum()) == ON_FRONT

    # as Tracker.log_fronts writes it, plotly.js beside it (the first source fails: pages try them in turn)
    page = tmp_path / "front_val_acc.html"
    page.write_text(front_page(table, ("gflops", "prompt_tokens"), "synthetic", "val_acc",
                               [("page", "missing/plotly.js"), ("page", "plotly.min.js")]))
    _write_plotly(tmp_path / "plotly.min.js")
    dom = _dump(browser, page.as_uri(), tmp_path / "profile")

    plots = dom.find_all("div", "js-plotly-plot")
    assert len(plots) == 2, "one figure per cost"
    traces = plots[0].find_all("g", "trace")
    assert traces, "plotly drew no traces"
    assert all("scatter" in trace.classes for trace in traces)
    # name each drawn trace by its legend entry: same marker colour
    legend = {}
    for entry in plots[0].find_all("g", "traces"):
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
    # the second figure (prompt tokens) draws every trial too
    assert len(plots[1].find_all("path", "point")) == len(ROWS)


def test_front_page_says_so_when_plotly_cannot_load(tmp_path):
    page = tmp_path / "front_val_acc.html"
    page.write_text(front_page(_trials(), ("gflops",), "synthetic", "val_acc", [("page", "plotly.min.js")]))
    dom = _dump(_chromium(), page.as_uri(), tmp_path / "profile")
    assert not dom.find_all("div", "js-plotly-plot")
    (message,) = [node for node in _walk(dom) if node.attrs.get("id") == "missing"]
    assert message.style["display"] == "block"


def _walk(node: _Node):
    for child in node.children:
        yield child
        yield from _walk(child)


SEARCH_SPEC = """\
name: ui
backbone: {model: vit_tiny_patch16_224, weights: random, img_size: 32}
data: {root: null, tasks: [digits]}
space:
  num_prompts: {int: [1, 8]}
  placement: {choice: [shallow, deep]}
  base_lr: {float: [0.05, 0.5], log: true}
train: {epochs: 1, batch_size: 64, warmup_epochs: 0}
search: {sampler: random, trials_per_task: 2, seed: 3}
tracking: {mlflow_uri: "sqlite:///%(root)s/mlflow.db", experiment: ui}
storage: %(root)s/results
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free local port over ``tmp_path/mlflow.db``; yields its address."""
    port = _free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "mlflow-server.log").read_text()[-2000:]
                time.sleep(1)
        yield address
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


def test_mlflow_ui_shows_a_finished_searchs_fronts(tmp_path, mlflow_server):
    """A real search from the command line, then MLflow's UI as a user opens it: the link the search
    prints, the search run's metrics, and each front page drawn inside MLflow's artifact viewer with one
    marker per finished trial in each of its two figures. Screenshots are left in ``tmp_path``."""
    from playwright.sync_api import sync_playwright

    browser = _chromium()
    (tmp_path / "spec.yaml").write_text(SEARCH_SPEC % {"root": tmp_path})
    done = subprocess.run([sys.executable, "-m", "vpt_tune.cli", "search", "spec.yaml", "--name", "ui"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (link,) = re.findall(r"then (http://127\.0\.0\.1:5000/\S+)", done.stdout)
    experiment_id, parent = re.fullmatch(r".*/#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning",
                                         link).groups()
    finished = int((pd.read_parquet(tmp_path / "results" / "ui" / "trials.parquet")["status"] == "finished").sum())
    assert finished >= 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (task_run,) = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(link.replace("http://127.0.0.1:5000", mlflow_server))
        page.get_by_text("digits/front_size").first.wait_for(timeout=60_000)  # the search run's summary metrics
        assert page.get_by_text("Model training").count() >= 1  # the model-training view, not GenAI's
        page.screenshot(path=tmp_path / "search_run.png")
        for run, artifact in ((parent, "digits/front_val_acc.html"), (task_run.info.run_id, "front_val_acc.html")):
            page.goto(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run}/artifacts/{artifact}"
                      "?workflowType=machine_learning")
            frame = page.frame_locator("iframe.mlflow-html-iframe")
            plots = frame.locator(".js-plotly-plot")
            plots.nth(1).locator(".point").first.wait_for(timeout=60_000)
            assert plots.count() == 2
            for i in range(2):  # each figure: every finished trial once, on the front or dominated
                assert plots.nth(i).locator(".point").count() == finished
            assert frame.locator("#missing").is_hidden()
            page.screenshot(path=tmp_path / f"{artifact.replace('/', '_')}.png")
        chromium.close()
