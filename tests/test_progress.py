"""The search's progress lines (no Ray: Tune's callback hooks called with stand-in trials)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from vpt_tune.search.runner import ProgressPrinter


def _trial(trial_id: str, config: dict, acc: float, tokens: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config, status="TERMINATED",
                           last_result={"val_acc": acc, "prompt_tokens": tokens, "gflops": 0.2 + tokens / 100})


def test_a_line_per_ended_trial_with_reference_points_counted_apart():
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("vpt_tune.search.runner")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        printer = ProgressPrinter({"digits": 2}, {"digits": 0}, references={"digits": 1})
        reference = _trial("r", {"reference_trial": {"task": "digits", "reference": "linear", "base_lr": 0.1}}, 0.5, 0)
        first, second = _trial("a", {"task": "digits"}, 0.8, 4), _trial("b", {"task": "digits"}, 0.9, 8)
        second.status = "ERROR"
        printer.on_trial_complete(1, [reference], reference)
        printer.on_trial_complete(2, [reference, first], first)
        printer.on_trial_error(3, [reference, first, second], second)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(lines) == 3
    assert lines[0].startswith("[digits reference] 1/1 trials | r: val_acc 0.500, 0.0 tokens")
    assert lines[1].startswith("[digits] 1/2 trials | a: val_acc 0.800") and "front: 1 pts" in lines[1]  # the reference is on no front
    assert lines[2].startswith("[digits] 2/2 trials | b: FAILED") and "front: 1 pts" in lines[2]
