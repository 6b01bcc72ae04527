"""Demand records in Redis: the proxy writes them, the operator scales OnDemand models by them.

Shared by the proxy and the operator; the layout and the rules are DESIGN.md's
"Demand in Redis". Per AIModel (and per LiveRunner, whose sessions are its jobs, under the
subject `live_runner_subject(name)`: no AIModel name holds a `/`):

    kubepeer:demand:{namespace}:{aimodel}     hash
        last_request  unix seconds of the latest job start or end
        sleeping      unix seconds the operator claimed the model idle (scale to zero);
                      cleared by the next job start, which must then wake the model
    kubepeer:inflight:{namespace}:{aimodel}   sorted set: job id -> expiry (unix seconds)

A job in flight counts only until its expiry, so a proxy that crashes mid-job pins
nothing for longer than `JOB_TTL_SECONDS`; a live proxy refreshes it (`job_alive`) while
the job runs. The proxy calls three functions; the operator two:

    proxy:    job_started -> bool (True: wake the model), job_alive, job_finished
    operator: read_demand, claim_idle (compare-and-set: idle and nothing in flight)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

JOB_TTL_SECONDS = 60.0  # the proxy refreshes in-flight jobs at least every third of this

# KEYS: demand hash, in-flight set. ARGV: job id, expiry, now.
# Records the job and says whether the operator had claimed the model idle.
_JOB_STARTED = """
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], 'last_request', ARGV[3])
return redis.call('HDEL', KEYS[1], 'sleeping')
"""
# KEYS: demand hash, in-flight set. ARGV: now, latest last_request that still counts as idle.
# Claims the model idle only if no unexpired job is in flight and no request came since.
_CLAIM_IDLE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_request') or '0')
if last > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'sleeping', ARGV[1])
return 1
"""


def live_runner_subject(live_runner: str) -> str:
    """The name a LiveRunner's demand records go under, beside AIModels' own names."""
    return f"liverunner/{live_runner}"


def demand_key(namespace: str, aimodel: str) -> str:
    return f"kubepeer:demand:{namespace}:{aimodel}"


def in_flight_key(namespace: str, aimodel: str) -> str:
    return f"kubepeer:inflight:{namespace}:{aimodel}"


def _keys(namespace: str, aimodel: str) -> list[str]:
    return [demand_key(namespace, aimodel), in_flight_key(namespace, aimodel)]


def _now(now: float | None) -> float:
    return time.time() if now is None else now


@dataclass(frozen=True)
class Demand:
    last_request: float | None = None
    in_flight: int = 0  # jobs whose expiry has not passed


# --- the proxy's side ---


def job_started(
    redis: Any,
    namespace: str,
    aimodel: str,
    job_id: str,
    now: float | None = None,
    ttl: float = JOB_TTL_SECONDS,
) -> bool:
    """Record a job admitted for `aimodel`. True when the operator has claimed the model
    idle: the caller must wake it (see DESIGN.md) even if it still looks awake.
    On a pipeline the command is queued, and its reply (1: wake) comes from execute()."""
    at = _now(now)
    woke = redis.eval(_JOB_STARTED, 2, *_keys(namespace, aimodel), job_id, repr(at + ttl), repr(at))
    return bool(woke)


def job_alive(
    redis: Any,
    namespace: str,
    aimodel: str,
    job_id: str,
    now: float | None = None,
    ttl: float = JOB_TTL_SECONDS,
) -> None:
    """Push a running job's expiry out; call at least every ttl/3 while it runs."""
    redis.zadd(in_flight_key(namespace, aimodel), {job_id: _now(now) + ttl}, xx=True)


def job_finished(
    redis: Any, namespace: str, aimodel: str, job_id: str, now: float | None = None
) -> None:
    """The job is done (or failed): it no longer holds the model, and it was demand.
    `redis` may be a pipeline (the proxy batches its records): then the commands are queued."""
    pipe = redis if hasattr(redis, "execute") else redis.pipeline()
    pipe.zrem(in_flight_key(namespace, aimodel), job_id)
    pipe.hset(demand_key(namespace, aimodel), "last_request", repr(_now(now)))
    if pipe is not redis:
        pipe.execute()


# --- the operator's side ---


def read_demand(redis: Any, namespace: str, aimodel: str, now: float | None = None) -> Demand:
    pipe = redis.pipeline()
    pipe.hget(demand_key(namespace, aimodel), "last_request")
    pipe.zcount(in_flight_key(namespace, aimodel), f"({_now(now)!r}", "+inf")
    last, in_flight = pipe.execute()
    return Demand(last_request=float(last) if last else None, in_flight=int(in_flight))


def claim_idle(
    redis: Any, namespace: str, aimodel: str, idle_since: float, now: float | None = None
) -> bool:
    """Atomically: no job in flight and no request after `idle_since` -> mark the model
    sleeping and return True. A job that starts afterwards sees the mark (job_started)."""
    claimed = redis.eval(
        _CLAIM_IDLE, 2, *_keys(namespace, aimodel), repr(_now(now)), repr(idle_since)
    )
    return bool(claimed)


def idle_for(demand: Demand, ready_at: float | None, now: float) -> float | None:
    """Seconds without demand, counted from the later of the last request and the moment a
    replica turned Ready; None while a job is in flight or before any replica is Ready
    (a model still loading is not idle)."""
    if demand.in_flight > 0 or ready_at is None:
        return None
    return now - max(ready_at, demand.last_request or 0.0)
