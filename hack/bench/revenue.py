#!/usr/bin/env python3
"""Revenue-aware warm pool: a replayed day of demand under four warm policies.

    .venv/bin/python hack/bench/revenue.py [--seed 7] [--models 20] [--gpus 8]

A seeded trace of eight days: 20 models, each with its own popularity (a long tail of rare
ones), a daily cycle at its own phase, bursts, a price per job and a cold start from its
size. Days 1-7 are history; day 8 is replayed, the same jobs under each policy:

- `always-top8`: the eight models that earned most in the history, warm all day;
- `on-demand-5m`, `on-demand-30m`: every model OnDemand with that idle timeout;
- `revenue`: each hour, `kubepeer.controller.revenue` forecasts every model's earnings from
  its records (the same hour of past days blended with the last hour), keeps warm those
  whose earnings beat their GPU time when cold starts lose jobs, ranks them by earnings per
  GPU-hour into the GPUs, and runs the rest OnDemand (5 min).

A job that finds its model asleep waits its cold start and is lost when that is longer than
the gateway's patience (a gateway moves to another orchestrator), as is a job whose model
cannot get a GPU. Reported per policy: revenue (jobs served x price), GPU-hours, net
(revenue - GPU-hours x the GPU price), cold starts and jobs lost, and net against the best
static policy of the same run ((net - best) / |best|: a net may be negative).

This is a simulation of the cluster (GPUs, wakes and idle timeouts), not the operator on the
test control plane: the decisions are the operator's own functions, the scheduling is the
simulator's. See issue 28's note for what the control-plane replay still needs.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
from dataclasses import dataclass, field

from kubepeer.controller.revenue import Candidate, Hour, decide, forecast, hourly, rank

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Model:
    name: str
    peak_per_hour: float  # jobs per hour at its daily peak
    phase: float  # its daily peak's hour
    price_wei: int  # per job
    cold_start: float  # seconds from a wake to ready (its load time, from its size)


@dataclass(frozen=True)
class Job:
    at: float  # seconds since the trace began
    model: str


def make_models(rng: random.Random, count: int) -> list[Model]:
    models = []
    for i in range(count):
        size_gb = rng.choice([2, 4, 7, 13, 20, 35])
        models.append(Model(
            name=f"model-{i:02d}",
            peak_per_hour=400 / (i + 1) ** 1.3,  # a long tail: model-19 about 8 jobs at peak
            phase=rng.uniform(0, 24),
            price_wei=rng.choice([3, 5, 8, 12, 20, 30]) * 10**12,
            cold_start=10 + 5 * size_gb,  # 20 s for 2 GB to 185 s for 35 GB
        ))  # fmt: skip
    return models


def make_trace(rng: random.Random, models: list[Model], days: int) -> list[Job]:
    """Poisson arrivals at a rate that follows the day (thinned from the peak), with a few
    bursts of five times the rate for a quarter hour."""
    jobs: list[Job] = []
    for m in models:
        bursts = [rng.uniform(0, days * DAY) for _ in range(days * 2)]
        peak = m.peak_per_hour * 5 / HOUR  # the most a burst reaches, per second
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= days * DAY:
                break
            daily = 0.55 + 0.45 * math.cos(2 * math.pi * ((t / HOUR - m.phase) / 24))
            burst = 5 if any(b <= t < b + HOUR / 4 for b in bursts) else 1
            if rng.random() < daily * burst / 5:
                jobs.append(Job(t, m.name))
    return sorted(jobs, key=lambda j: j.at)


@dataclass
class Replica:
    since: float  # when its GPU was taken
    ready_at: float
    last_job: float
    warm: bool  # kept by the policy (no idle timeout)


@dataclass
class Result:
    served: int = 0
    lost: int = 0
    cold_starts: int = 0
    revenue_wei: int = 0
    gpu_seconds: float = 0.0
    records: dict[str, list[tuple[float, int, bool, bool]]] = field(default_factory=dict)

    def net(self, gpu_wei_per_hour: float) -> float:
        return self.revenue_wei - self.gpu_seconds / HOUR * gpu_wei_per_hour


class Cluster:
    """GPUs, one replica per awake model, OnDemand idle timeouts and wakes."""

    def __init__(self, models: dict[str, Model], gpus: int, patience: float) -> None:
        self.models, self.gpus, self.patience = models, gpus, patience
        self.replicas: dict[str, Replica] = {}
        self.result = Result()

    def release_idle(self, now: float, idle: float) -> None:
        for name, r in list(self.replicas.items()):
            until = max(r.last_job, r.ready_at) + self.idle_timeout(name, idle)
            if not r.warm and until <= now:
                self.release(name, until)

    def idle_timeout(self, name: str, idle: float) -> float:
        return idle

    def release(self, name: str, at: float) -> None:
        r = self.replicas.pop(name)
        self.result.gpu_seconds += max(0.0, at - r.since)

    def wake(self, name: str, now: float, warm: bool) -> Replica | None:
        if len(self.replicas) >= self.gpus and not self.preempt_for(name, now):
            return None
        r = Replica(now, now + self.models[name].cold_start, now, warm)
        self.replicas[name] = r
        self.result.cold_starts += 1
        return r

    def preempt_for(self, name: str, now: float) -> bool:
        """Whether a replica gave its GPU up for `name`'s: never under the static policies,
        whose OnDemand models share one priority (the scheduler preempts none of them)."""
        return False

    def job(self, job: Job) -> None:
        model = self.models[job.model]
        r = self.replicas.get(job.model)
        if r is None:
            r = self.wake(job.model, job.at, warm=False)
        if r is None:  # no GPU: refused for capacity
            self.result.lost += 1
            self.record(job, 0, cold=False, refused=True)
            return
        wait = max(0.0, r.ready_at - job.at)
        r.last_job = max(r.last_job, job.at)
        if wait > self.patience:
            self.result.lost += 1
            self.record(job, 0, cold=True, refused=False)
            return
        self.result.served += 1
        self.result.revenue_wei += model.price_wei
        self.record(job, model.price_wei, cold=wait > 0, refused=False)

    def record(self, job: Job, earned: int, *, cold: bool, refused: bool) -> None:
        self.result.records.setdefault(job.model, []).append((job.at, earned, cold, refused))

    def finish(self, end: float) -> Result:
        for name in list(self.replicas):
            self.release(name, end)
        return self.result


def replay_static(models: dict[str, Model], jobs: list[Job], start: float, end: float,
                  gpus: int, patience: float, idle: float, warm: list[str]) -> Result:  # fmt: skip
    cluster = Cluster(models, gpus, patience)
    for name in warm:
        cluster.replicas[name] = Replica(start, start, start, warm=True)  # warm from the start
    for job in jobs:
        cluster.release_idle(job.at, idle)
        cluster.job(job)
    cluster.release_idle(end, idle)
    return cluster.finish(end)


class RankedCluster(Cluster):
    """The revenue policy's priorities: a model that earns more per GPU-hour preempts an
    OnDemand replica that earns less (the operator's PriorityClass per rank)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.earnings: dict[str, float] = {}  # this hour's forecast, wei per hour
        self.idle: dict[str, float] = {}  # this hour's idle timeout per model

    def idle_timeout(self, name: str, idle: float) -> float:
        return self.idle.get(name, idle)

    def preempt_for(self, name: str, now: float) -> bool:
        mine = self.earnings.get(name, 0.0)
        cold = [n for n, r in self.replicas.items()
                if not r.warm and self.earnings.get(n, 0.0) < mine]  # fmt: skip
        if not cold:
            return False
        self.release(min(cold, key=lambda n: self.earnings.get(n, 0.0)), now)
        return True


def replay_revenue(models: dict[str, Model], history: dict[str, dict[int, Hour]],
                   jobs: list[Job], start: float, end: float, gpus: int, patience: float,
                   idle: float, gpu_wei_per_hour: float,
                   brief_idle: float) -> Result:  # fmt: skip
    cluster = RankedCluster(models, gpus, patience)
    times = [j.at for j in jobs]
    hour_start = start
    while hour_start < end:
        hour = int(hour_start // HOUR)
        # The records so far: the history, and this day's hours already replayed.
        seen = {name: history[name] | hourly(cluster.result.records.get(name, []))
                for name in models}  # fmt: skip
        wanted = []
        for name, m in models.items():
            expected = forecast(seen[name], hour)
            cluster.earnings[name] = expected.wei_per_hour
            d = decide(expected, gpu_cost_wei_per_hour=gpu_wei_per_hour,
                       cold_start_seconds=m.cold_start, patience_seconds=patience,
                       idle_timeout_seconds=idle, brief_idle_seconds=brief_idle)  # fmt: skip
            if d.warm:
                wanted.append(Candidate(name, 1, d.earnings))
            cluster.idle[name] = d.idle_timeout
        kept, _ = rank(wanted, gpus)
        for name, r in list(cluster.replicas.items()):
            r.warm = name in kept  # a model no longer kept is OnDemand from now
        for name in kept:
            if name not in cluster.replicas:
                cluster.wake(name, hour_start, warm=True)
        lo = bisect.bisect_left(times, hour_start)
        hi = bisect.bisect_left(times, min(end, hour_start + HOUR))
        for job in jobs[lo:hi]:
            cluster.release_idle(job.at, idle)
            cluster.job(job)
        hour_start += HOUR
    cluster.release_idle(end, idle)
    return cluster.finish(end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--brief-idle", type=float, default=90,
                        help="seconds an OnDemand model that does not pay stays awake")  # fmt: skip
    parser.add_argument("--patience", type=float, default=30, help="seconds a gateway waits")
    parser.add_argument("--gpu-price", type=float, default=0.0006,
                        help="ETH per GPU-hour (0.0006 ETH: about $2/h at $3,000)")  # fmt: skip
    args = parser.parse_args()
    rng = random.Random(args.seed)
    models = {m.name: m for m in make_models(rng, args.models)}
    trace = make_trace(rng, list(models.values()), days=8)
    start, end = 7 * DAY, 8 * DAY
    past = [j for j in trace if j.at < start]
    day = [j for j in trace if start <= j.at < end]
    gpu_wei = args.gpu_price * 1e18
    # The history as the proxy records it: every past job served (what it would have earned).
    history = {name: hourly([(j.at, models[name].price_wei, False, False)
                             for j in past if j.model == name]) for name in models}  # fmt: skip
    earned = {name: sum(h.earned_wei for h in hours.values()) for name, hours in history.items()}
    top = sorted(models, key=lambda n: -earned[n])[: args.gpus]
    print(f"trace: {len(models)} models on {args.gpus} GPUs, {len(past)} jobs of history, "
          f"{len(day)} replayed (seed {args.seed}); patience {args.patience:g} s, "
          f"GPU {args.gpu_price:g} ETH/h")  # fmt: skip
    runs = {
        "always-top8": replay_static(
            models, day, start, end, args.gpus, args.patience, idle=5 * 60, warm=top
        ),
        "on-demand-5m": replay_static(
            models, day, start, end, args.gpus, args.patience, idle=5 * 60, warm=[]
        ),
        "on-demand-30m": replay_static(
            models, day, start, end, args.gpus, args.patience, idle=30 * 60, warm=[]
        ),
    }
    runs["revenue"] = replay_revenue(models, history, day, start, end, args.gpus,
                                        args.patience, 5 * 60, gpu_wei,
                                        args.brief_idle)  # fmt: skip
    best_static = max(r.net(gpu_wei) for name, r in runs.items() if name != "revenue")
    print(f"{'policy':<15}{'revenue ETH':>12}{'GPU-h':>8}{'net ETH':>10}{'cold starts':>13}"
          f"{'jobs lost':>11}{'net vs best static':>20}")  # fmt: skip
    for name, r in runs.items():
        gain = (r.net(gpu_wei) - best_static) / abs(best_static)  # nets may be negative
        print(f"{name:<15}{r.revenue_wei / 1e18:>12.4f}{r.gpu_seconds / HOUR:>8.1f}"
              f"{r.net(gpu_wei) / 1e18:>10.4f}{r.cold_starts:>13}{r.lost:>11}"
              f"{gain:>+20.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
