"""Which replica takes a job: least in flight under each replica's capacity, waiters in order.

In-memory and per proxy replica: each replica of the proxy counts what it sent. A job
that finds every slot taken waits in a bounded per-model queue (with a timeout); a job
for a model with no ready replica at all waits as a hold (the caller wakes the model).
Waiters are served strictly in arrival order: a new job never jumps the queue.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kubepeer.contracts.price_table import ServedModel


class NoCapacity(Exception):
    """No slot now and none worth waiting for: go-livepeer's `insufficient capacity`."""


@dataclass(frozen=True)
class Slot:
    aimodel: str
    url: str


@dataclass
class _Waiter:
    model: ServedModel
    future: asyncio.Future[Slot]
    exclude: frozenset[str]
    since: float = field(default_factory=time.monotonic)


class Router:
    def __init__(self, max_queue: int = 8) -> None:
        self.max_queue = max_queue
        self._urls: dict[str, tuple[str, ...]] = {}  # runner Service -> ready URLs
        self._in_flight: dict[tuple[str, str], int] = {}  # (url, aimodel) -> jobs
        self._waiters: dict[str, deque[_Waiter]] = {}  # aimodel -> waiters, oldest first

    # -- endpoints -------------------------------------------------------------------
    def set_endpoints(
        self, table: dict[str, tuple[str, ...]], models: Iterable[ServedModel]
    ) -> None:
        self._urls = dict(table)
        self.serve_waiters(models)

    def serve_waiters(self, models: Iterable[ServedModel]) -> None:
        for model in models:
            self._serve_waiters(model)

    def urls(self, model: ServedModel) -> tuple[str, ...]:
        return self._urls.get(model.runner, ())

    def service_urls(self, service: str) -> tuple[str, ...]:
        """The ready URLs of any workload Service (a runner's, or a Live Runner app's)."""
        return self._urls.get(service, ())

    def ready(self, model: ServedModel) -> bool:
        return bool(self.urls(model))

    # -- counting ----------------------------------------------------------------------
    def in_flight(self, model: ServedModel) -> int:
        return sum(self._in_flight.get((u, model.aimodel), 0) for u in self.urls(model))

    def free_slots(self, model: ServedModel) -> int:
        return sum(
            max(0, model.capacity - self._in_flight.get((u, model.aimodel), 0))
            for u in self.urls(model)
        )

    def utilization(self, model: ServedModel) -> float:
        return self.group_utilization((model,))

    def group_utilization(self, models: Iterable[ServedModel]) -> float:
        """Jobs in flight over slots, across AIModels that serve one model together."""
        models = tuple(models)
        total = sum(m.capacity * len(self.urls(m)) for m in models)
        return 1.0 if total == 0 else sum(self.in_flight(m) for m in models) / total

    def queued(self, model: ServedModel) -> int:
        return len(self._waiters.get(model.aimodel, ()))

    # -- several AIModels serving one (pipeline, model id) --------------------------------
    def choose(self, models: Sequence[ServedModel]) -> ServedModel:
        """Which of the AIModels serving a job's model takes it: every ready replica of
        every one is a candidate. The least busy replica with a free slot, where no one is
        waiting (ties at random); else the ready model with the shortest line; else (none
        ready) an OnDemand one, to be woken; else the first, which refuses the job."""
        if not models:
            raise ValueError("no model to choose from")
        if len(models) == 1:  # the usual case, and every rule below picks it
            return models[0]
        open_ = [
            (self._in_flight.get((url, m.aimodel), 0), m)
            for m in models
            if not self._waiters.get(m.aimodel)
            for url in self.urls(m)
            if self._in_flight.get((url, m.aimodel), 0) < m.capacity
        ]
        if open_:
            least = min(busy for busy, _ in open_)
            return random.choice([m for busy, m in open_ if busy == least])
        ready = [m for m in models if self.ready(m)]
        if ready:
            return min(ready, key=lambda m: (self.queued(m), -m.capacity * len(self.urls(m))))
        return next((m for m in models if m.on_demand), models[0])

    # -- taking and giving back slots ----------------------------------------------------
    def _pick(self, model: ServedModel, exclude: frozenset[str]) -> Slot | None:
        """The least busy replica with a free slot; ties broken at random so that several
        proxy replicas do not all pile onto the same runner."""
        least, ties = model.capacity, []  # one pass: this runs for every job
        for url in self.urls(model):
            if url in exclude:
                continue
            busy = self._in_flight.get((url, model.aimodel), 0)
            if busy < least:
                least, ties = busy, [url]
            elif busy == least < model.capacity:
                ties.append(url)
        if not ties:
            return None
        url = ties[0] if len(ties) == 1 else random.choice(ties)
        key = (url, model.aimodel)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return Slot(model.aimodel, url)

    def try_reserve(self, model: ServedModel, exclude: Iterable[str] = ()) -> Slot | None:
        if self._waiters.get(model.aimodel):
            return None  # others were first
        return self._pick(model, frozenset(exclude))

    async def reserve(
        self,
        model: ServedModel,
        *,
        timeout: float,
        hold: bool = False,
        exclude: Iterable[str] = (),
    ) -> Slot:
        """A slot now, or after waiting in line. `hold` waits for a model with no ready
        replica (being woken) without the queue bound."""
        excluded = frozenset(exclude)
        slot = self.try_reserve(model, excluded)
        if slot is not None:
            return slot
        waiting = self._waiters.setdefault(model.aimodel, deque())
        if not hold and (not self.ready(model) or len(waiting) >= self.max_queue):
            raise NoCapacity(model.aimodel)
        waiter = _Waiter(model, asyncio.get_running_loop().create_future(), excluded)
        waiting.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # granted as we timed out
            raise NoCapacity(model.aimodel) from None
        finally:
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()

    def release(self, slot: Slot, model: ServedModel | None = None) -> None:
        key = (slot.url, slot.aimodel)
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        if model is not None:
            self._serve_waiters(model)

    def _serve_waiters(self, model: ServedModel) -> None:
        waiting = self._waiters.get(model.aimodel)
        while waiting:
            head = waiting[0]
            if head.future.done():
                waiting.popleft()
                continue
            slot = self._pick(model, head.exclude)
            if slot is None:
                return
            waiting.popleft()
            head.future.set_result(slot)
