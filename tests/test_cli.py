"""The command line: help, cost, and user errors (one line, exit code 2, nothing written, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import ray
import torch
import yaml

from vpt_tune.search.runner import run_search
from vpt_tune.data.splits import DataError
from vpt_tune.spec import SpecError, validate

from test_data import _write_task
from test_search import small_spec


def vpt_tune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vpt_tune.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_help_lists_commands():
    out = vpt_tune("--help").stdout
    for command in ("search", "pareto", "cost"):
        assert command in out
    assert "--set" in vpt_tune("search", "--help").stdout


def test_cost_prints_paper_gflops():
    out = vpt_tune("cost", "--model", "vit_base_patch16_224", "--img-size", "224", "--prompts", "50").stdout
    assert "22.22" in out
    out = vpt_tune("cost", "--prompts", "10", "--placement", "last_k", "--depth", "3").stdout
    assert "prompt tokens    2.5" in out


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"space": {"num_prompts": {"int": [8, 1]}}}, "space.num_prompts: low 8 > high 1"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"search": {"sampler": "cmaes"}}, "unknown sampler 'cmaes'"),
        ({"backbone": {"model": "vit_nope", "weights": "random"}}, "backbone.model"),
    ],
)
def test_bad_spec_is_one_line_exit_2(tmp_path, edit, message):
    raw = small_spec(tmp_path)
    raw.update(edit)
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    proc = vpt_tune("search", str(spec_file), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
    debug = vpt_tune("--debug", "search", str(spec_file), cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_malformed_set_and_missing_spec(tmp_path):
    proc = vpt_tune("search", "demo", "--set", "search.trials_per_task", cwd=tmp_path)
    assert proc.returncode == 2 and "expected key.path=value" in proc.stderr
    proc = vpt_tune("search", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "spec file not found" in proc.stderr
    proc = vpt_tune("pareto", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "no trial table" in proc.stderr


def test_preflight_errors_before_ray(tmp_path):
    """Bad models, weights, depths and tasks are refused before Ray starts or anything is written."""
    cases = [
        ({"backbone": {"model": "vit_nope", "weights": "random"}}, "backbone.model"),
        ({"backbone": {"model": "vit_tiny_patch16_224", "weights": str(tmp_path / "w.pt")}}, "backbone.weights"),
        ({"data": {"root": str(tmp_path / "nowhere"), "tasks": ["cifar"]}}, "data.root"),
        ({"data": {"root": str(tmp_path), "tasks": ["cifar", "dtd"]}}, "cifar100, dtd"),  # canonical names
    ]
    (tmp_path / "a_file").write_text("")
    cases += [
        ({"storage": str(tmp_path / "a_file" / "results")}, "storage: cannot create"),
        ({"tracking": {"mlflow_uri": "http://127.0.0.1:9"}}, "tracking.mlflow_uri: no MLflow server answers"),
        ({"tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/nowhere/mlflow.db"}}, "tracking.mlflow_uri: .* writable"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"resources": {"gpus_per_worker": 1}}, "resources.gpus_per_worker: .* this machine has none"))
    for sections, message in cases:
        spec = validate(small_spec(tmp_path, **sections))
        with pytest.raises(SpecError, match=message):
            run_search(spec, name="never")
    data_root = tmp_path / "vtab"
    task = _write_task(data_root)
    (task / "images" / "blue.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="blue.png: unreadable or corrupt image"):
        run_search(validate(small_spec(tmp_path, data={"root": str(data_root), "tasks": ["toy"]})), name="never")
    raw = small_spec(tmp_path)
    raw["space"]["depth"] = {"int": [1, 24], "when": {"placement": ["last_k"]}}
    with pytest.raises(SpecError, match="space.depth"):
        run_search(validate(raw), name="never")
    assert not ray.is_initialized()  # nothing expensive started
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written


def test_only_the_command_line_prints(capsys):
    """Library code logs through `logging`; the command line decides what reaches the terminal."""
    import ast
    import logging
    from pathlib import Path

    import vpt_tune
    from vpt_tune.cli import log_to_terminal

    package = Path(vpt_tune.__file__).parent
    printing = [f"{path.relative_to(package)}:{node.lineno}" for path in package.rglob("*.py") if path.name != "cli.py"
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert printing == []
    log_to_terminal()
    log_to_terminal()  # once is enough: no line twice
    logging.getLogger("vpt_tune.search.runner").info("experiment: %s", "here")
    logging.getLogger("vpt_tune.search.runner").debug("not shown")
    assert capsys.readouterr().out == "experiment: here\n"
