"""bench/gpu_check.py's reduced CPU mode runs end to end (its GPU mode runs where a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_its_cpu_mode_and_says_what_it_skipped():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["mode"] == "cpu"
    assert report["correctness"]["passed"] >= 5 and report["correctness"]["failed"] == 0
    assert {r["attention"] for r in report["speed"]} == {"fused", "plain"}
    assert [(s["trials"], s["finished"]) for s in report["searches"]] == [(2, 2)]
    assert any("packed" in part for part in report["skipped"]) and "skipped on CPU:" in result.stdout
