"""The slot pool: the queue of a search's trials and its slots' assignments, between the trials' Tune drivers
(:func:`relay`) and the slots' workers (:mod:`vpt_tune.train.slot_worker`); see :mod:`vpt_tune.search.slots`.

No torch or timm here: a trial driver on slots only relays, so its process (one per trial running at once, on
the head of a cluster) imports Ray and this module, not the training code (its imports: 1.6 s of CPU and
0.19 GB of memory instead of 6.4 s and 0.99 GB).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune

from vpt_tune.train.slot_protocol import CLOSED

log = logging.getLogger(__name__)
POLL_S = 1.0  # a driver's longest wait for news (short: Tune reuses a driver only once its function returns)
TAKE_WAIT_S = 5.0  # a worker's longest wait for a trial before it asks again
DRIVER_SILENCE_S = 120.0  # a trial whose driver has not asked for news this long is dropped (the driver is gone)
# A slot whose rank 0 has not sent a heartbeat this long is down (its worker group restarts, maybe waiting for
# resources a lost node took along): a free slot takes over its trial (from its last checkpoint).
ORPHAN_S = 30.0


class TrialFailed(RuntimeError):
    """A trial failed on its slot more often than ``train.max_failures`` allows (the message has the last error)."""


@dataclass
class _Trial:
    """A trial the pool knows: queued (no slot yet), training on a slot, or ended (``outcome`` set)."""

    config: dict[str, Any]  # as Tune sampled it: the slot's workers make the trial's job of it
    started_at: float  # when its driver handed it over (time.time())
    start_id: str  # that hand-over's id
    heard: float  # when its driver last asked for news (time.monotonic())
    slot: int | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None  # "done", or why it failed
    attempts: int = 0  # worker-group restarts while it trained
    error: str = ""  # the last exception its workers raised


class SlotPool:
    """The search's queue of trials and its slots' assignments: an async Ray actor between trial drivers
    (``submit``, ``poll``, ``release``) and slot workers (``take``, ``report``, ``finish``, ``failed``)."""

    def __init__(self, slots: int, max_failures: int):
        self.assigned: list[str | None] = [None] * slots  # each slot's trial (kept once ended, until the next)
        self.alive = [True] * slots
        self.beats = [time.monotonic()] * slots  # each slot's last heartbeat
        self.max_failures = max_failures
        self.trials: dict[str, _Trial] = {}
        self.queue: deque[str] = deque()
        self.closed = False
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # made in the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait(self, timeout: float) -> None:
        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ trial drivers

    async def submit(self, trial: str, config: dict[str, Any], started_at: float, start_id: str) -> None:
        """Queue ``trial`` (``config`` as sampled, handed over at ``started_at`` with ``start_id``); one still
        training (its driver was restarted) goes on, heard by the new driver."""
        known = self.trials.get(trial)
        if known is not None and known.outcome is None:
            known.reports.clear()
            known.heard = time.monotonic()
        else:
            self.trials[trial] = _Trial(config, started_at, start_id, time.monotonic())
            self.queue.append(trial)
        if not any(self.alive):
            self._end(trial, "every slot of the search failed to start its workers; see the log for why")
        await self._notify()

    async def poll(self, trial: str, seen: int, timeout: float) -> tuple[list[dict], str | None]:
        """The reports of ``trial`` after the first ``seen``, and its outcome once it ended; waits up to
        ``timeout`` seconds for either."""
        record = self.trials.get(trial)
        if record is None:  # dropped while its driver was silent (see DRIVER_SILENCE_S)
            return [], f"dropped: its driver did not ask for news for over {DRIVER_SILENCE_S:.0f} s"
        deadline = time.monotonic() + timeout
        while len(record.reports) <= seen and record.outcome is None and time.monotonic() < deadline:
            record.heard = time.monotonic()
            await self._wait(deadline - time.monotonic())
        record.heard = time.monotonic()
        return record.reports[seen:], record.outcome

    async def release(self, trial: str) -> None:
        """The driver of ``trial`` is done with it (ended or stopped): forget it; a slot still training it
        drops it at its next report."""
        if self.trials.pop(trial, None) is not None and trial in self.queue:
            self.queue.remove(trial)
        await self._notify()

    # ------------------------------------------------------------------ slot workers

    async def heartbeat(self, slot: int) -> None:
        """``slot``'s rank 0 lives (sent every few seconds while its worker function runs)."""
        self.beats[slot] = time.monotonic()

    async def take(self, slot: int, rank: int, previous: str | None) -> dict | str | None:
        """The trial for ``slot``'s worker of ``rank`` to train after ``previous`` (None: the worker group has
        just started, so a trial it was training is handed again); None when there is none yet (ask again),
        :data:`CLOSED` once the search is over."""
        self.beats[slot] = time.monotonic()
        current = self.trials.get(self.assigned[slot] or "")
        if rank == 0 and previous is None and current is not None and current.outcome is None:
            current.attempts += 1  # the slot's worker group was restarted while it trained this trial
            if current.attempts > self.max_failures:
                self._end(self.assigned[slot], f"its workers failed {current.attempts} times (train.max_failures: "
                          f"{self.max_failures}); last error:\n{current.error or 'a worker process died'}")
        deadline = time.monotonic() + TAKE_WAIT_S
        while not self.closed:
            name = self.assigned[slot]
            current = self.trials.get(name or "")
            if current is not None and current.outcome is None and name != previous:
                return self._lease(name)
            if rank == 0 and (current is None or current.outcome is not None):  # free: the next trial, if any
                self._adopt_orphans()
                if self._assign(slot):
                    await self._notify()  # the group's other ranks wait for this assignment
                    return self._lease(self.assigned[slot])
            if time.monotonic() >= deadline:
                return None
            await self._wait(deadline - time.monotonic())
        return CLOSED

    def _adopt_orphans(self) -> None:
        """Queue first the trials of slots that are down (no heartbeat for ``ORPHAN_S``), counting it as a failure."""
        for down, name in enumerate(self.assigned):
            record = self.trials.get(name or "")
            if record is None or record.outcome is not None or time.monotonic() - self.beats[down] < ORPHAN_S:
                continue
            log.warning("slot %d is down (no heartbeat for %.0f s): trial %s moves to the next free slot", down,
                        time.monotonic() - self.beats[down], name)
            record.attempts += 1
            record.slot, self.assigned[down] = None, None
            if record.attempts > self.max_failures:
                self._end(name, f"its workers failed {record.attempts} times (train.max_failures: {self.max_failures}); "
                          f"last: its slot was down for over {ORPHAN_S:.0f} s")
            else:
                self.queue.appendleft(name)

    def _assign(self, slot: int) -> bool:
        """Give ``slot`` the next queued trial whose driver still listens; whether there was one."""
        while self.queue:
            name = self.queue.popleft()
            record = self.trials[name]
            if time.monotonic() - record.heard > DRIVER_SILENCE_S:
                del self.trials[name]
                continue
            record.slot, self.assigned[slot] = slot, name
            return True
        return False

    def _lease(self, name: str) -> dict:
        record = self.trials[name]
        return {"trial": name, "config": record.config, "started_at": record.started_at, "start_id": record.start_id}

    async def report(self, slot: int, trial: str, metrics: dict[str, Any]) -> bool:
        """``slot``'s report of ``trial``; False: nobody listens any more, or the trial moved to another slot
        (the slot drops the trial)."""
        record = self.trials.get(trial)
        if self.closed or record is None or record.outcome is not None or record.slot != slot or \
                time.monotonic() - record.heard > DRIVER_SILENCE_S:
            return False
        record.reports.append(metrics)
        await self._notify()
        return True

    async def finish(self, slot: int, trial: str) -> None:
        """``trial`` ended on ``slot`` (finished, stopped at a rung, or dropped there)."""
        if self.assigned[slot] == trial:  # not a trial that moved on to another slot
            self._end(trial, "done")
        await self._notify()

    async def failed(self, slot: int, trial: str, error: str) -> None:
        """``trial`` raised ``error`` on ``slot``, whose worker group Ray Train now restarts."""
        if trial in self.trials and self.assigned[slot] == trial:
            self.trials[trial].error = error

    async def slot_ended(self, slot: int, error: str | None) -> None:
        """``slot``'s Train run ended (the search closed it, or it could not restart its workers)."""
        self.alive[slot] = False
        if error:
            self._end(self.assigned[slot], f"its slot's Ray Train run failed: {error}")
            if not any(self.alive):
                for name in list(self.queue):
                    self._end(name, f"every slot of the search failed; the last: {error}")
                self.queue.clear()
        await self._notify()

    async def close(self) -> None:
        """The search is over: every slot's workers return, ending their Train runs."""
        self.closed = True
        await self._notify()

    def _end(self, trial: str | None, outcome: str) -> None:
        record = self.trials.get(trial or "")
        if record is not None and record.outcome is None:
            record.outcome = outcome


def relay(pool: ray.actor.ActorHandle, trial: str, config: dict[str, Any]) -> dict[str, Any]:
    """A trial driver's part on slots: hand the trial (its ``config`` as sampled) to the pool, report each epoch
    to Tune as the slot reports it, and return the trial's last report once it ended. Raises
    :class:`TrialFailed` if it failed."""
    ray.get(pool.submit.remote(trial, config, time.time(), uuid.uuid4().hex))
    seen, last = 0, {}
    try:
        while True:
            reports, outcome = ray.get(pool.poll.remote(trial, seen, POLL_S))
            for metrics in reports:
                tune.report(metrics)
                last = metrics
            seen += len(reports)
            if outcome is not None:
                break
    finally:
        pool.release.remote(trial)  # whatever ended the driver: the slot moves on
    if outcome != "done":
        raise TrialFailed(f"trial {trial}: {outcome}")
    return last
