"""Keep warm what earns: a workload's demand forecast, and whether its earnings pay for its
GPU time. Pure functions, no I/O: the operator feeds them the hourly earnings records
(`contracts/earnings.py`'s `Hour`), and the replay bench (hack/bench/revenue.py) a trace.

The decision compares two ways to run one model for the next window:

- **warm**: it serves every job and pays for its GPUs the whole time;
- **cold** (OnDemand): it pays only while awake, but a job that finds it asleep waits a cold
  start, and the gateway gives up on it when that is longer than its patience.

With jobs arriving at `rate` per hour and an OnDemand model sleeping after `idle` hours
without a job, a job finds the model asleep when no job came in the `idle` before it:
probability `asleep = exp(-rate * idle)`, which is also the share of time it sleeps. Going
cold therefore saves `gpu_cost * asleep` an hour and loses `earnings * asleep` an hour when
a cold start outlasts the gateway's patience (nothing otherwise). It stays warm while what a
cold start would lose is at least what sleeping would save:

    keep warm  <=>  lost_cold >= saved_cold
               <=>  earnings * asleep * [cold_start > patience] >= gpu_cost * asleep

so, when cold starts lose jobs, exactly while the expected earnings cover the GPU time, and
never when gateways wait cold starts out. A model that is not kept warm is still woken on
demand, but one whose earnings do not cover its GPU time sleeps as soon as its jobs stop
(`brief_idle_seconds` instead of its idle timeout): awake and idle, it pays for the GPU and
earns nothing. When GPUs are too few for every model that should be warm, `rank` keeps the
ones that earn the most per GPU-hour.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kubepeer.contracts.earnings import HOUR_SECONDS, Hour

DAY_HOURS = 24


@dataclass(frozen=True)
class Forecast:
    """Expected demand over the next hour."""

    wei_per_hour: float
    jobs_per_hour: float


def forecast(
    history: Mapping[int, Hour], hour: int, *, days: int = 7, recent: float = 0.5
) -> Forecast:
    """The next hour (`hour`, in hours since the epoch) from the same hour of up to `days`
    past days, blended with the last complete hour (`hour - 1`) at weight `recent`. With no
    past day on record, the last hour alone; with nothing at all, zero."""
    if not 0 <= recent <= 1:
        raise ValueError(f"recent must be within [0, 1], not {recent}")
    same_hour = [history[h] for d in range(1, days + 1) if (h := hour - d * DAY_HOURS) in history]
    last = history.get(hour - 1, Hour())
    if not same_hour:
        return Forecast(float(last.earned_wei), float(last.jobs + last.refused))
    seasonal_wei = sum(h.earned_wei for h in same_hour) / len(same_hour)
    seasonal_jobs = sum(h.jobs + h.refused for h in same_hour) / len(same_hour)
    return Forecast(
        recent * last.earned_wei + (1 - recent) * seasonal_wei,
        recent * (last.jobs + last.refused) + (1 - recent) * seasonal_jobs,
    )


@dataclass(frozen=True)
class Decision:
    warm: bool
    idle_timeout: float  # seconds, when not warm: its own, or brief when it does not pay
    earnings: float  # wei per hour expected
    gpu_cost: float  # wei per hour of the model's GPUs
    lost_cold: float  # wei per hour a cold model would lose to cold starts
    saved_cold: float  # wei per hour of GPU time a cold model would not pay

    @property
    def reason(self) -> str:
        """The event and condition message, with its numbers."""
        verdict = "kept warm" if self.warm else f"on demand, idle {self.idle_timeout:g}s"
        return (
            f"{verdict}: {eth(self.earnings)} ETH/h expected vs {eth(self.gpu_cost)} ETH/h GPU "
            f"cost; cold would lose {eth(self.lost_cold)} ETH/h and save "
            f"{eth(self.saved_cold)} ETH/h"
        )


def decide(
    expected: Forecast,
    *,
    gpu_cost_wei_per_hour: float,
    cold_start_seconds: float,
    patience_seconds: float,
    idle_timeout_seconds: float,
    brief_idle_seconds: float = 90.0,
) -> Decision:
    """Warm or cold for the next window (see the module's docstring for the rule)."""
    for name, value in (("gpu_cost_wei_per_hour", gpu_cost_wei_per_hour),
                        ("cold_start_seconds", cold_start_seconds),
                        ("patience_seconds", patience_seconds),
                        ("idle_timeout_seconds", idle_timeout_seconds)):  # fmt: skip
        if value < 0:
            raise ValueError(f"{name} must not be negative, not {value}")
    asleep = math.exp(-expected.jobs_per_hour * idle_timeout_seconds / HOUR_SECONDS)
    loses = cold_start_seconds > patience_seconds
    lost = expected.wei_per_hour * asleep if loses else 0.0
    saved = gpu_cost_wei_per_hour * asleep
    pays = expected.wei_per_hour >= gpu_cost_wei_per_hour
    return Decision(
        warm=expected.jobs_per_hour > 0 and lost >= saved,
        idle_timeout=idle_timeout_seconds
        if pays
        else min(idle_timeout_seconds, brief_idle_seconds),
        earnings=expected.wei_per_hour,
        gpu_cost=gpu_cost_wei_per_hour,
        lost_cold=lost,
        saved_cold=saved,
    )


@dataclass(frozen=True)
class Candidate:
    name: str
    gpus: int
    earnings: float  # wei per hour expected


def rank(candidates: Iterable[Candidate], gpus: int) -> tuple[list[str], list[str]]:
    """Which of the models that should be warm fit on `gpus` GPUs: by earnings per GPU-hour,
    highest first (ties by name, so that a decision is stable); returns (kept, preempted)."""
    kept: list[str] = []
    preempted: list[str] = []
    free = gpus
    order = sorted(candidates, key=lambda c: (-c.earnings / max(c.gpus, 1), c.name))
    for candidate in order:
        if candidate.gpus <= free:
            kept.append(candidate.name)
            free -= candidate.gpus
        else:
            preempted.append(candidate.name)
    return kept, preempted


def eth(wei: float) -> str:
    """wei as ETH with two significant decimals for messages: 8.2e17 -> '0.82'."""
    value = wei / 1e18
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.2g}"


def hourly(records: Sequence[tuple[float, int, bool, bool]]) -> dict[int, Hour]:
    """Jobs as (unix seconds, earned wei, waited on a cold start, refused) into hours."""
    hours: dict[int, list[int]] = {}
    for at, earned, cold, refused in records:
        row = hours.setdefault(int(at // HOUR_SECONDS), [0, 0, 0, 0])
        if refused:
            row[3] += 1
            continue
        row[0] += earned
        row[1] += 1
        row[2] += int(cold)
    return {h: Hour(*row) for h, row in hours.items()}
