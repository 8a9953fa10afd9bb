"""Slots: the pool's hand-over rules (plain asyncio), and real slots on a local Ray training trial after trial."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import ray
import torch

from vpt_tune.search import slot_pool as pool_module
from vpt_tune.search.jobs import TrialSetup
from vpt_tune.search.slot_pool import SlotPool
from vpt_tune.search.slots import Slots
from vpt_tune.train.slot_protocol import CLOSED, SLOT, SLOT_TRIAL
from vpt_tune.train.slot_worker import CHECKPOINT_PATH, TrialCheckpoints


# ---------------------------------------------------------------- the pool's rules, without Ray


def _run(coroutine):
    return asyncio.run(coroutine)


def test_the_pool_hands_trials_in_order_and_each_slot_one_at_a_time(monkeypatch):
    monkeypatch.setattr(pool_module, "TAKE_WAIT_S", 0.05)

    async def scenario():
        pool = SlotPool(slots=2, max_failures=1)
        for name in ("a", "b", "c"):
            await pool.submit(name, {"n": name}, 0.0, f"start-{name}")
        first = await pool.take(0, 0, None)
        second = await pool.take(1, 0, None)
        assert (first["trial"], second["trial"]) == ("a", "b") and first["config"] == {"n": "a"}
        assert await pool.take(0, 0, "a") is None  # slot 0 still trains a: nothing new for it
        assert await pool.report(0, "a", {"epoch": 1})
        assert await pool.poll("a", 0, 0.01) == ([{"epoch": 1}], None)
        await pool.finish(0, "a")
        assert await pool.poll("a", 1, 0.01) == ([], "done")
        assert (await pool.take(0, 0, "a"))["trial"] == "c"  # the next queued trial, once a ended
        await pool.close()
        assert await pool.take(1, 0, "b") == CLOSED

    _run(scenario())


def test_a_restarted_worker_group_gets_its_trial_again_until_max_failures(monkeypatch):
    monkeypatch.setattr(pool_module, "TAKE_WAIT_S", 0.05)

    async def scenario():
        pool = SlotPool(slots=1, max_failures=1)
        await pool.submit("a", {}, 0.0, "s")
        assert (await pool.take(0, 0, None))["trial"] == "a"
        await pool.failed(0, "a", "ValueError: boom")
        assert (await pool.take(0, 0, None))["trial"] == "a"  # restart 1 of 1 allowed: continues from its checkpoint
        assert await pool.take(0, 0, None) is None  # restart 2: the trial fails, the slot waits for the next
        reports, outcome = await pool.poll("a", 0, 0.01)
        assert "failed 2 times" in outcome and "ValueError: boom" in outcome

    _run(scenario())


def test_other_ranks_train_what_rank_0_was_given(monkeypatch):
    monkeypatch.setattr(pool_module, "TAKE_WAIT_S", 0.5)

    async def scenario():
        pool = SlotPool(slots=1, max_failures=0)
        await pool.submit("a", {}, 0.0, "s")
        waiting = asyncio.ensure_future(pool.take(0, 1, None))  # rank 1 asks first: it waits for rank 0
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert (await pool.take(0, 0, None))["trial"] == "a"
        assert (await waiting)["trial"] == "a"

    _run(scenario())


def test_a_trial_whose_driver_is_gone_is_dropped(monkeypatch):
    monkeypatch.setattr(pool_module, "TAKE_WAIT_S", 0.05)
    monkeypatch.setattr(pool_module, "DRIVER_SILENCE_S", 0.2)

    async def scenario():
        pool = SlotPool(slots=1, max_failures=0)
        await pool.submit("a", {}, 0.0, "s")
        await pool.submit("b", {}, 0.0, "s")
        assert (await pool.take(0, 0, None))["trial"] == "a"
        await pool.release("a")  # its driver ended (stopped): the slot's next report is refused
        assert not await pool.report(0, "a", {"epoch": 1})
        await pool.finish(0, "a")
        await asyncio.sleep(0.3)  # b's driver fell silent (killed) before b started: b is skipped
        await pool.submit("c", {}, 0.0, "s")
        assert (await pool.take(0, 0, "a"))["trial"] == "c"
        assert await pool.report(0, "c", {"epoch": 1})

    _run(scenario())


def test_the_trial_of_a_slot_that_stays_down_moves_to_a_free_slot(monkeypatch):
    """A lost node can take the resources a slot's restarted workers need while the other slots hold theirs: after
    ORPHAN_S without a heartbeat, the next free slot takes its trial over, and the old slot can no longer end it."""
    monkeypatch.setattr(pool_module, "TAKE_WAIT_S", 0.05)
    monkeypatch.setattr(pool_module, "ORPHAN_S", 0.2)

    async def scenario():
        pool = SlotPool(slots=2, max_failures=1)
        for name in ("a", "b"):
            await pool.submit(name, {}, 0.0, "s")
        assert (await pool.take(0, 0, None))["trial"] == "a"
        assert (await pool.take(1, 0, None))["trial"] == "b"
        await pool.finish(1, "b")
        for _ in range(4):  # slot 0 went silent; slot 1 lives on
            await asyncio.sleep(0.1)
            await pool.heartbeat(1)
            await pool.poll("a", 0, 0.01)  # a's driver still listens
        assert (await pool.take(1, 0, "b"))["trial"] == "a"  # free slot 1 takes a over (its last checkpoint)
        assert not await pool.report(0, "a", {"epoch": 2})  # slot 0 back: its report is refused, its end ignored
        await pool.finish(0, "a")
        assert await pool.poll("a", 0, 0.01) == ([], None)
        assert await pool.report(1, "a", {"epoch": 2})
        assert await pool.take(0, 0, None) is None  # slot 0 restarted: a is not its trial any more

    _run(scenario())


def test_a_trial_driver_and_the_pool_import_no_training_code():
    """On slots a trial's driver only relays: its process (one per trial running at once, on a cluster's head) and
    the pool's import neither torch nor timm."""
    code = ("import sys, vpt_tune.search.driver, vpt_tune.search.slot_pool; "
            "print(sorted(m for m in ('torch', 'timm', 'vpt_tune.train.job') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_checkpoints_are_whole_and_the_newest_two_kept(tmp_path):
    checkpoints = TrialCheckpoints(tmp_path / "trial")
    assert checkpoints.latest() is None and checkpoints.load() is None
    for epoch in (1, 2, 3):
        checkpoints.save({"epoch": torch.tensor(epoch)}, epoch)
    (tmp_path / "trial" / ".tmp-half-written").mkdir()  # a writer killed mid-way leaves only a hidden folder
    assert sorted(p.name for p in (tmp_path / "trial").glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000003"]
    assert int(checkpoints.load()["epoch"]) == 3


# ---------------------------------------------------------------- real slots (local Ray)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _train(pool, name: str, config: dict) -> list[dict]:
    """Hand ``config`` (as Tune samples it) to the pool as a trial driver does; the trial's reports once it ended."""
    ray.get(pool.submit.remote(name, config, time.time(), name))
    reports, outcome = [], None
    while outcome is None:
        new, outcome = ray.get(pool.poll.remote(name, len(reports), 1.0))
        reports += new
    ray.get(pool.release.remote(name))
    assert outcome == "done", outcome
    return reports


@pytest.mark.slow
def test_one_slot_trains_each_trial_as_a_fresh_process_would(tmp_path, local_ray):
    """Isolation: config A first and third on one slot (B, different, between) gives the same bits both times, and
    the same as A trained in a fresh process; the slot's worker started once."""
    from test_search import small_spec

    from vpt_tune.search.runner import task_dirs
    from vpt_tune.spec import validate
    from vpt_tune.train.job import CHECKPOINT_FILE

    spec = validate(small_spec(tmp_path, train={"epochs": 2, "batch_size": 64, "warmup_epochs": 0, "reuse_base": False}))
    folders = {task: str(folder) for task, folder in task_dirs(spec).items()}
    a = {"task": "digits", "num_prompts": 4, "placement": "deep", "base_lr": 0.3}
    b = {"task": "digits", "num_prompts": 7, "placement": "last_k", "depth": 5, "base_lr": 0.1}
    setup = TrialSetup(spec, folders, str(tmp_path), "")
    slots = Slots(setup, 1, tmp_path / "slots")
    try:
        runs = {name: _train(slots.pool, name, config) for name, config in (("a1", a), ("b", b), ("a2", a))}
    finally:
        slots.close()
    assert [runs[n][-1][SLOT_TRIAL] for n in ("a1", "b", "a2")] == [1, 2, 3]  # one worker process, three trials
    assert {r[SLOT] for n in runs for r in runs[n]} == {0}
    curve = {n: [(r["epoch"], r["train_loss"], r["val_acc"]) for r in runs[n]] for n in runs}
    assert curve["a1"] == curve["a2"] and curve["a1"] != curve["b"]
    trained = {n: torch.load(f"{runs[n][-1][CHECKPOINT_PATH]}/{CHECKPOINT_FILE}", weights_only=True)["trainable"]
               for n in runs}
    assert trained["a1"].keys() == trained["a2"].keys()
    assert all(torch.equal(trained["a1"][k], trained["a2"][k]) for k in trained["a1"])

    # The same job in a fresh process (1 thread, as the slot's worker): the same bits.
    job = setup.worker_config(a, "fresh", time.time(), "fresh")["job"]
    fresh_file = tmp_path / "fresh.pt"
    script = ("import json, sys, torch; from vpt_tune.train.job import Job, run; torch.set_num_threads(1); "
              "model, metrics = run(Job.from_dict(json.loads(sys.argv[1])), torch.device('cpu')); "
              "torch.save({'trainable': model.trainable_state(), 'val_acc': metrics['val_acc']}, sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, json.dumps(job), str(fresh_file)], check=True, timeout=300)
    fresh = torch.load(fresh_file, weights_only=True)
    assert fresh["val_acc"] == runs["a1"][-1]["val_acc"]
    assert all(torch.equal(fresh["trainable"][k], trained["a1"][k]) for k in trained["a1"])


@pytest.mark.slow
def test_a_slot_drops_a_trial_whose_driver_stopped_and_trains_the_next(tmp_path, local_ray):
    from test_search import small_spec

    from vpt_tune.search.runner import task_dirs
    from vpt_tune.spec import validate

    spec = validate(small_spec(tmp_path, train={"epochs": 8, "batch_size": 64, "warmup_epochs": 0, "reuse_base": False}))
    folders = {task: str(folder) for task, folder in task_dirs(spec).items()}
    config = {"task": "digits", "num_prompts": 2, "placement": "deep", "base_lr": 0.3}
    slots = Slots(TrialSetup(spec, folders, str(tmp_path), ""), 1, tmp_path / "slots")
    try:
        ray.get(slots.pool.submit.remote("long", config, time.time(), "long"))
        deadline = time.monotonic() + 120
        while not ray.get(slots.pool.poll.remote("long", 0, 1.0))[0]:  # its first epoch reported
            assert time.monotonic() < deadline
        ray.get(slots.pool.release.remote("long"))  # the driver stopped: 7 epochs left untrained
        reports = _train(slots.pool, "short", config)
    finally:
        slots.close()
    assert reports[-1][SLOT_TRIAL] == 2 and reports[-1]["epoch"] == 8
    long_epochs = sorted(TrialCheckpoints(tmp_path / "long").folder.glob("checkpoint_*"))
    assert long_epochs and int(long_epochs[-1].name.split("_")[1]) < 8  # it ended at the next report


@pytest.mark.slow
def test_a_slot_of_two_data_parallel_workers_trains_trial_after_trial(tmp_path, local_ray):
    """workers_per_trial: 2: one slot of two DDP workers; both ranks train each trial the pool hands rank 0."""
    from test_search import small_spec

    from vpt_tune.search.runner import run_search
    from vpt_tune.spec import validate

    raw = small_spec(tmp_path, resources={"workers_per_trial": 2, "cpus_per_worker": 1})
    raw["search"]["trials_per_task"] = 3
    table = run_search(validate(raw), name="ddp").table
    assert (table["status"] == "finished").all() and (table["epoch"] == 2).all()
    assert sorted(table["slot_trial"]) == [1, 2, 3] and set(table["slot"]) == {0}
    assert (table["startup_seconds"][table["slot_trial"] > 1] < 2).all()  # handed over, no Ray Train start-up
