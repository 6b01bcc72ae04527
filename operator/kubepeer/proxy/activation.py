"""Step 4 of a job: which AIModel takes it, and a slot on one of its runners.

A job for a model with a slot free takes it at once. With every slot taken it waits in
line (`queue_timeout`); for an OnDemand model with no ready replica it is held while the
model wakes (`hold_timeout`), the operator asked for a replica once however many jobs
arrive (`Waker`). Waiting for nothing and no line: 503 `insufficient capacity`, which a
gateway takes as full and tries another orchestrator.

The demand records the operator reads to scale OnDemand models to zero (`Demand`) are
written from the job's choice of model to its end, and its earnings records (what served
jobs earned, and which were refused for capacity) when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from kubepeer.contracts.price_table import ServedModel
from kubepeer.proxy import metrics
from kubepeer.proxy.jobs import INSUFFICIENT_CAPACITY, JobRefused
from kubepeer.proxy.routing import NoCapacity, Router, Slot

log = logging.getLogger("kubepeer.proxy")


class Waker:
    """Raises an OnDemand model's replicas from zero (the proxy's edge to the API server)."""

    async def wake(self, model: ServedModel) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Demand:
    """Demand records the operator reads (no-op when the proxy has no Redis for them)."""

    def start(self, model: ServedModel, job_id: str) -> Awaitable[bool] | None:
        """Record a job. For an OnDemand model, resolves True when the operator had claimed
        the model idle (wake it); None for any other (nothing to wait for)."""
        if not model.on_demand:
            return None
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(False)
        return done

    def end(self, model: ServedModel, job_id: str) -> None: ...

    def served(self, subject: str, earned_wei: int, cold: bool, pipe: Any = None) -> None:
        """Record a served job's earnings (`contracts/earnings.py`); `cold`: it arrived while
        its model had no ready replica. `pipe`: the job's own write pipeline, when it has
        one to send (its fee's: no round trip of its own), else written off the path."""

    def refused(self, subject: str) -> None:
        """Record a job refused for capacity."""


@dataclass(frozen=True)
class Waits:
    """How long a job may wait for a slot: in line, or held while its model wakes."""

    queue: float
    hold: float


class Activation:
    def __init__(self, router: Router, waits: Waits, waker: Waker | None = None,
                 demand: Demand | None = None) -> None:  # fmt: skip
        self.router = router
        self.waits = waits
        self.waker = waker
        self.demand = demand or Demand()
        self._waking: set[str] = set()  # AIModels asked for a replica, not yet ready

    def choose(self, serving: tuple[ServedModel, ...]) -> ServedModel:
        """The AIModel of those serving the job's model that takes it (503 if none)."""
        if not serving:
            raise JobRefused(503, INSUFFICIENT_CAPACITY)
        return self.router.choose(serving)

    async def slot(self, model: ServedModel, woke: Awaitable[bool] | None) -> Slot:
        """A slot on one of `model`'s runners: free now, or waited for (in line, or held
        while the model wakes). `woke`: the job's demand record's answer (True: the operator
        had just claimed the model idle, so it is woken again)."""
        if woke is not None and await woke:
            await self.wake(model, force=True)
        slot = self.router.try_reserve(model)
        if slot is not None:
            return slot
        hold = model.on_demand and not self.router.ready(model)
        metrics.QUEUED.labels(model.aimodel).inc()
        started = time.monotonic()
        waiting = asyncio.ensure_future(self.router.reserve(
            model, timeout=self.waits.hold if hold else self.waits.queue, hold=hold))  # fmt: skip
        try:
            if hold:
                await asyncio.sleep(0)  # take our place in line before the (slow) wake call
                await self.wake(model)
            return await waiting
        except NoCapacity:
            self.demand.refused(model.aimodel)
            raise JobRefused(503, INSUFFICIENT_CAPACITY) from None
        finally:
            if not waiting.done():
                waiting.cancel()
            metrics.QUEUED.labels(model.aimodel).dec()
            metrics.HOLD.labels(model.aimodel).observe(time.monotonic() - started)

    async def elsewhere(self, model: ServedModel, tried: Iterable[str]) -> Slot:
        """A slot on another of `model`'s runners than those `tried` (a runner went before
        answering: the job goes to another once), waited for in line."""
        try:
            return await self.router.reserve(model, timeout=self.waits.queue,
                                             exclude=list(tried))  # fmt: skip
        except NoCapacity:
            self.demand.refused(model.aimodel)
            raise JobRefused(503, INSUFFICIENT_CAPACITY) from None

    def release(self, slot: Slot, model: ServedModel) -> None:
        self.router.release(slot, model)

    async def wake(self, model: ServedModel, force: bool = False) -> None:
        """Ask for a replica once per model, however many jobs arrive while it wakes
        (`force`: again, because the operator has just claimed it idle)."""
        if self.waker is None or (model.aimodel in self._waking and not force):
            return
        self._waking.add(model.aimodel)
        try:
            await self.waker.wake(model)
        except Exception:
            self._waking.discard(model.aimodel)
            log.exception("could not wake %s", model.aimodel)
            raise JobRefused(503, INSUFFICIENT_CAPACITY) from None

    def ready_again(self, models: Iterable[ServedModel]) -> None:
        """Endpoints changed: a model that became ready is awake."""
        for model in models:
            if self.router.ready(model):
                self._waking.discard(model.aimodel)
