"""How an early-stopping decision reaches a trial's Train workers: a file next to the trial's Train run.

A worker that reports a rung epoch names a decision file in that report and waits for the search to write
``continue`` or ``stop`` there (:mod:`vpt_tune.search.scheduler` judges the report). On ``stop`` the worker
returns from its training function: the Train run ends as a finished one does and frees its workers at once,
and the trial's driver ends normally (so Tune may reuse it for the next trial).

Why not Tune's STOP: it ends the trial's driver process, and with it the Train controller, abruptly; Ray
Train V2 then frees the orphaned workers' CPUs only once the State API reports that controller dead, which
on a busy small machine did not happen in time: every stop leaked a CPU until the search hung. A file works
on every node because the experiment folder is shared by all nodes at the same path (see ``storage``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

RUNG_DECISION = "rung_decision"  # result key of a rung report: the file its decision goes to
CONTINUE, STOP = "continue", "stop"
DECISION_TIMEOUT_S = 600.0  # a decision takes about a second; a search that stops answering is stalled


def decision_file(folder: str | Path, epoch: int) -> Path:
    """The file the decision on rung ``epoch`` goes to, in a trial attempt's decision ``folder``."""
    return Path(folder, f"epoch-{epoch}")


def tell(path: str | Path, continues: bool) -> None:
    """Write a decision (atomically: a worker never reads half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(CONTINUE if continues else STOP)
    os.replace(tmp, path)


def await_decision(path: str | Path, timeout: float = DECISION_TIMEOUT_S, poll: float = 0.1) -> bool:
    """Wait until the decision at ``path`` is written: whether the trial trains on. Raises TimeoutError
    after ``timeout`` seconds (Ray Train then restarts the worker group, which reports the rung again)."""
    path, deadline = Path(path), time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no early-stopping decision in {path} after {timeout:.0f} s: the search "
                               "did not judge this rung report (is its driver stalled?)")
        time.sleep(poll)
    return path.read_text() == CONTINUE
