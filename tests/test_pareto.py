"""Non-dominated sets on constructed tables, and the front figures."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vpt_tune.search.pareto import front_figure, front_page, front_png, pareto_mask

ACC_TOKENS = {"val_acc": "max", "prompt_tokens": "min"}


def _table(rows) -> pd.DataFrame:
    """rows: (val_acc, prompt_tokens, gflops)."""
    table = pd.DataFrame(rows, columns=["val_acc", "prompt_tokens", "gflops"])
    table["trial_id"] = [f"t{i}" for i in range(len(table))]
    table["config"] = [json.dumps({"num_prompts": i, "placement": "deep"}) for i in range(len(table))]
    return table


# A: front; B: front (fewer tokens); C: dominated by A; D: identical to A; E: front (best accuracy);
# F: dominated by B (same tokens, worse accuracy); G: dominated by A on both objectives.
TABLE = _table([
    (0.90, 10, 5.0),  # A
    (0.80, 5, 4.0),   # B
    (0.70, 10, 5.0),  # C
    (0.90, 10, 5.0),  # D
    (0.95, 20, 7.0),  # E
    (0.60, 5, 4.0),   # F
    (0.85, 15, 6.0),  # G
])
FRONT_2D = [True, True, False, True, True, False, False]


def test_dominated_points_are_excluded_and_ties_kept():
    assert pareto_mask(TABLE, ACC_TOKENS).tolist() == FRONT_2D


def test_directions_are_respected():
    # maximising tokens instead: E (20 tokens, best accuracy) dominates everything else
    assert pareto_mask(TABLE, {"val_acc": "max", "prompt_tokens": "max"}).tolist() == [
        False, False, False, False, True, False, False]
    # minimising accuracy and tokens: F (0.60, 5) dominates everything else
    assert pareto_mask(TABLE, {"val_acc": "min", "prompt_tokens": "min"}).tolist() == [
        False, False, False, False, False, True, False]


def test_third_objective_can_rescue_a_point():
    table = _table([(0.90, 10, 5.0), (0.85, 12, 3.0), (0.80, 12, 6.0)])
    assert pareto_mask(table, ACC_TOKENS).tolist() == [True, False, False]
    # the default objectives are val_acc (max), prompt_tokens (min), gflops (min)
    assert pareto_mask(table).tolist() == [True, True, False]


def test_single_objective_and_edge_cases():
    assert pareto_mask(TABLE, {"val_acc": "max"}).tolist() == [False, False, False, False, True, False, False]
    assert pareto_mask(TABLE.iloc[:0], ACC_TOKENS).shape == (0,)
    assert pareto_mask(TABLE.iloc[[2]], ACC_TOKENS).tolist() == [True]
    same = _table([(0.5, 3, 1.0)] * 4)
    assert pareto_mask(same).all()


def test_mask_is_positional_not_by_index_label():
    shuffled = TABLE.sample(frac=1.0, random_state=0)
    expected = [FRONT_2D[i] for i in shuffled.index]
    assert pareto_mask(shuffled, ACC_TOKENS).tolist() == expected


def test_random_table_against_brute_force():
    rng = np.random.default_rng(0)
    table = _table(np.column_stack([rng.random(60).round(1), rng.integers(0, 6, 60), rng.random(60).round(1)]))
    mask = pareto_mask(table)
    values = table[["val_acc", "prompt_tokens", "gflops"]].to_numpy() * np.array([-1, 1, 1])
    for i in range(len(table)):
        dominated = any((values[j] <= values[i]).all() and (values[j] < values[i]).any() for j in range(len(table)))
        assert mask[i] == (not dominated)


@pytest.mark.parametrize("cost", ["prompt_tokens", "gflops"])
def test_front_figure_splits_all_points(cost):
    fig = front_figure(TABLE, cost, "toy task")
    by_name = {trace.name: trace for trace in fig.data}
    assert set(by_name) == {"dominated", "Pareto front"}
    points = lambda trace: sorted(zip(trace.x, trace.y))  # noqa: E731
    front = pareto_mask(TABLE, {"val_acc": "max", cost: "min"})
    assert points(by_name["Pareto front"]) == sorted(zip(TABLE[cost][front], TABLE["val_acc"][front]))
    assert points(by_name["dominated"]) == sorted(zip(TABLE[cost][~front], TABLE["val_acc"][~front]))
    assert len(by_name["Pareto front"].x) + len(by_name["dominated"].x) == len(TABLE)
    assert list(by_name["Pareto front"].x) == sorted(by_name["Pareto front"].x)  # drawn left to right
    assert by_name["dominated"].opacity < by_name["Pareto front"].opacity
    hover = dict(zip(by_name["Pareto front"].x, by_name["Pareto front"].text))[TABLE[cost][4]]  # E's point
    assert hover.split("<br>") == ["trial t4", "val_acc 0.950", "prompt tokens 20", "GFLOPs 7.000", "4 deep"]
    assert "3-objective front" in fig.layout.annotations[0].text  # says what the 2-D plot leaves out
    assert fig.layout.title.text == "toy task" and fig.layout.xaxis.title.text == cost


def test_front_png_writes_an_image(tmp_path):
    path = tmp_path / "front.png"
    front_png(TABLE, "gflops", "toy task", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        # not blank: plotted points and text make many distinct colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 10


def test_front_page_is_small_and_loads_plotly_from_its_sources():
    rng = np.random.default_rng(0)
    big = _table(list(zip(rng.uniform(0.5, 0.9, 64), rng.integers(1, 200, 64), rng.uniform(2, 9, 64))))
    sources = [("server", "get-artifact?path=plotly.min.mjs&run_uuid=abc"), ("page", "../plotly.min.mjs")]
    page = front_page(big, ("prompt_tokens", "gflops"), "toy </script> task", "val_acc", sources)
    assert len(page.encode()) < 300_000  # plotly.js alone is 4.6 MB
    assert "Plotly.newPlot" in page and "plotly.js v" not in page  # draws with plotly.js, does not hold it
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert data["sources"] == [list(source) for source in sources]
    for cost, figure in zip(("prompt_tokens", "gflops"), data["figures"]):
        front = pareto_mask(big, {"val_acc": "max", cost: "min"})
        assert [trace["name"] for trace in figure["data"]] == ["dominated", "Pareto front"]
        xs = [np.frombuffer(base64.b64decode(t["x"]["bdata"]), t["x"]["dtype"]) for t in figure["data"]]  # typed
        assert [len(x) for x in xs] == [int((~front).sum()), int(front.sum())]
        assert sorted(np.concatenate(xs)) == sorted(big[cost])
    assert page.count("</script>") == 2  # a title holding "</script>" cannot end the data early
