"""What each workload's jobs earned, by the hour, in Redis: the proxy writes, the operator
reads (DESIGN.md, "Earnings in Redis"; the revenue-aware warm policy decides from it).

    kubepeer:earnings:{namespace}:{subject}    hash, kept EARNINGS_DAYS after its last write
        {hour}:wei      what the hour's jobs earned: the fees debited at the payment's
                        expected price (the expected value of the tickets that paid them)
        {hour}:jobs     jobs served
        {hour}:cold     of them, jobs that arrived while their model had no ready replica
        {hour}:refused  jobs refused for capacity (no slot within the queue or hold timeout)

`{hour}` is hours since the epoch; `subject` is the AIModel's name, or a LiveRunner's
`live_runner_subject`. Every write is an HINCRBY, so any number of proxy replicas add up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

HOUR_SECONDS = 3600
EARNINGS_DAYS = 8  # a week of the same hour, and the day being replayed
FIELDS = ("wei", "jobs", "cold", "refused")


@dataclass(frozen=True)
class Hour:
    """One hour of one workload's records."""

    earned_wei: int = 0
    jobs: int = 0
    cold_waits: int = 0
    refused: int = 0


def earnings_key(namespace: str, subject: str) -> str:
    return f"kubepeer:earnings:{namespace}:{subject}"


def hour_of(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // HOUR_SECONDS)


def record_served(pipe: Any, namespace: str, subject: str, *, earned_wei: int, cold: bool,
                  now: float | None = None) -> None:  # fmt: skip
    """Queue one served job on `pipe` (a Redis pipeline, sync or asyncio)."""
    key, hour = earnings_key(namespace, subject), hour_of(now)
    if earned_wei:
        pipe.hincrby(key, f"{hour}:wei", earned_wei)
    pipe.hincrby(key, f"{hour}:jobs", 1)
    if cold:
        pipe.hincrby(key, f"{hour}:cold", 1)
    pipe.expire(key, EARNINGS_DAYS * 24 * HOUR_SECONDS)


def record_refused(pipe: Any, namespace: str, subject: str, now: float | None = None) -> None:
    key = earnings_key(namespace, subject)
    pipe.hincrby(key, f"{hour_of(now)}:refused", 1)
    pipe.expire(key, EARNINGS_DAYS * 24 * HOUR_SECONDS)


def parse_hours(fields: dict[bytes | str, bytes | str]) -> dict[int, Hour]:
    """An earnings hash as read (HGETALL) into hours; a field it does not know is skipped."""
    rows: dict[int, dict[str, int]] = {}
    for name, value in fields.items():
        text = name.decode() if isinstance(name, bytes) else name
        hour, _, kind = text.partition(":")
        if kind in FIELDS and hour.isdigit():
            rows.setdefault(int(hour), {})[kind] = int(value)
    return {hour: Hour(row.get("wei", 0), row.get("jobs", 0), row.get("cold", 0),
                       row.get("refused", 0)) for hour, row in rows.items()}  # fmt: skip


def read_hours(redis: Any, namespace: str, subject: str) -> dict[int, Hour]:
    """The workload's hours on record (a sync Redis client)."""
    return parse_hours(redis.hgetall(earnings_key(namespace, subject)))
