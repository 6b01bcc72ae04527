"""Demand records in Redis: the proxy writes them, the operator scales OnDemand models by them.

Layout (one hash per AIModel):
    kubepeer:demand:{namespace}:{aimodel}
        last_request  unix seconds (float) the last job for this model arrived
        in_flight     jobs admitted and not yet finished (may briefly read < 0 after a crash
                      of the proxy; read as 0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class RedisLike(Protocol):  # the few calls we make; satisfied by redis.Redis
    def hgetall(self, name: str) -> dict[bytes, bytes]: ...
    def hset(self, name: str, key: str, value: str) -> int: ...
    def hincrby(self, name: str, key: str, amount: int = 1) -> int: ...


def demand_key(namespace: str, aimodel: str) -> str:
    return f"kubepeer:demand:{namespace}:{aimodel}"


@dataclass(frozen=True)
class Demand:
    last_request: float | None = None
    in_flight: int = 0


def read_demand(redis: RedisLike, namespace: str, aimodel: str) -> Demand:
    raw = redis.hgetall(demand_key(namespace, aimodel))
    last = raw.get(b"last_request")
    return Demand(
        last_request=float(last) if last else None,
        in_flight=max(0, int(raw.get(b"in_flight", b"0"))),
    )


def record_job_start(
    redis: RedisLike, namespace: str, aimodel: str, now: float | None = None
) -> None:
    key = demand_key(namespace, aimodel)
    redis.hset(key, "last_request", repr(now if now is not None else time.time()))
    redis.hincrby(key, "in_flight", 1)


def record_job_end(redis: RedisLike, namespace: str, aimodel: str) -> None:
    redis.hincrby(demand_key(namespace, aimodel), "in_flight", -1)


def idle_for(demand: Demand, woken_at: float | None, now: float) -> float | None:
    """Seconds without demand, counted from the later of the last request and the wake-up;
    None while a job is in flight."""
    if demand.in_flight > 0:
        return None
    since = max(t for t in (demand.last_request, woken_at, 0.0) if t is not None)
    return now - since
