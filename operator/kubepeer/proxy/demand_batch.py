"""DESIGN.md's demand records (kubepeer/contracts/demand.py), written off the request path.

Each job writes two records (its start and its end) and every job in flight is refreshed
every ttl/3. Written one round trip at a time on the event loop they cost more than the
rest of a fast job (hack/bench/proxy.py); here every record queued while one write is on
the wire goes out in the next single pipeline, and no caller blocks the loop. A job
awaits its start record only when the answer matters (an OnDemand model the operator may
have claimed idle: then it must wake the model). A record not yet written when the proxy
crashes is like one written and expired: the operator's rules already cover it.

Only OnDemand models get demand records: the operator reads them for nothing else (scale
to zero). A model switched to OnDemand while its jobs run has them recorded at the next
heartbeat (ttl/3), well inside any idle timeout. Every model gets earnings records
(`contracts/earnings.py`), in the same pipelines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kubepeer.contracts import demand as demand_records
from kubepeer.contracts import earnings
from kubepeer.contracts.price_table import ServedModel
from kubepeer.proxy.activation import Demand

log = logging.getLogger("kubepeer.proxy")


class BatchedDemand(Demand):
    def __init__(self, redis: Callable[[], Any], namespace: str, ttl: float) -> None:
        self._redis_factory = redis  # a redis.asyncio client, made inside the running loop
        self._redis: Any = None
        self.namespace = namespace
        self.ttl = ttl
        # aimodel -> ids of the jobs in flight here, with and without demand records
        self.recorded: dict[str, set[str]] = {}
        self.unrecorded: dict[str, set[str]] = {}
        # (kind, subject, job id or a served job's (earned wei, cold), the start's answer)
        self._queued: list[tuple[str, str, Any, asyncio.Future[bool] | None]] = []
        self._writer: asyncio.Task[None] | None = None

    def start(self, model: ServedModel, job_id: str) -> asyncio.Future[bool] | None:
        return self.start_subject(model.aimodel, model.on_demand, job_id)

    def end(self, model: ServedModel, job_id: str) -> None:
        self.end_subject(model.aimodel, job_id)

    def start_subject(
        self, subject: str, on_demand: bool, job_id: str
    ) -> asyncio.Future[bool] | None:
        """`start` for any subject the records go under: an AIModel's name, or a
        LiveRunner's (`live_runner_subject`)."""
        if not on_demand:
            self.unrecorded.setdefault(subject, set()).add(job_id)
            return None
        woke: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.recorded.setdefault(subject, set()).add(job_id)
        self._queue("started", subject, job_id, woke)
        return woke

    def end_subject(self, subject: str, job_id: str) -> None:
        self.unrecorded.get(subject, set()).discard(job_id)
        if job_id in self.recorded.get(subject, ()):
            self.recorded[subject].discard(job_id)
            self._queue("finished", subject, job_id, None)

    def served(self, subject: str, earned_wei: int, cold: bool, pipe: Any = None) -> None:
        if pipe is not None:
            earnings.record_served(pipe, self.namespace, subject, earned_wei=earned_wei,
                                   cold=cold)  # fmt: skip
        else:
            self._queue("served", subject, (earned_wei, cold), None)

    def refused(self, subject: str) -> None:
        self._queue("refused", subject, None, None)

    def heartbeat(self, on_demand: Iterable[str] = ()) -> None:
        """Push out the expiries of recorded jobs; record the running jobs of models that
        became OnDemand (`on_demand`: their aimodel names) since those jobs started."""
        for aimodel in on_demand:
            for job_id in self.unrecorded.pop(aimodel, set()):
                self.recorded.setdefault(aimodel, set()).add(job_id)
                self._queue("started", aimodel, job_id, None)
        for aimodel, jobs in list(self.recorded.items()):
            for job_id in list(jobs):
                self._queue("alive", aimodel, job_id, None)

    async def flushed(self) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _queue(
        self, kind: str, aimodel: str, job_id: Any, woke: asyncio.Future[bool] | None
    ) -> None:
        self._queued.append((kind, aimodel, job_id, woke))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        if self._redis is None:
            self._redis = self._redis_factory()
        while self._queued:
            batch, self._queued = self._queued, []
            pipe = self._redis.pipeline(transaction=False)
            replies_at: list[int] = []  # where each record's first reply will be
            for kind, aimodel, job_id, _ in batch:
                replies_at.append(len(pipe))
                if kind == "served":
                    earned, cold = job_id
                    earnings.record_served(pipe, self.namespace, aimodel, earned_wei=earned,
                                           cold=cold)  # fmt: skip
                elif kind == "refused":
                    earnings.record_refused(pipe, self.namespace, aimodel)
                elif kind == "started":
                    demand_records.job_started(pipe, self.namespace, aimodel, job_id, ttl=self.ttl)
                elif kind == "finished":
                    demand_records.job_finished(pipe, self.namespace, aimodel, job_id)
                else:
                    demand_records.job_alive(pipe, self.namespace, aimodel, job_id, ttl=self.ttl)
            try:
                replies = await pipe.execute()
            except Exception:
                log.exception("could not write %d demand records", len(batch))
                replies = None
            for (_, _, _, woke), at in zip(batch, replies_at, strict=True):
                if woke is not None and not woke.done():
                    woke.set_result(bool(replies and replies[at]))
