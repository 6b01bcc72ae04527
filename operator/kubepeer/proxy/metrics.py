"""Prometheus metrics of the proxy, per model (tickets are counted by the ledger)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

IN_FLIGHT = Gauge("kubepeer_proxy_in_flight", "Jobs sent to runners, not yet answered", ["model"])
QUEUED = Gauge("kubepeer_proxy_queue_depth", "Jobs waiting for a slot or a wake-up", ["model"])
REQUESTS = Counter(
    "kubepeer_proxy_requests_total", "Jobs by outcome (HTTP status)", ["model", "status"]
)
LATENCY = Histogram(
    "kubepeer_proxy_request_seconds",
    "Job time from arrival to answer",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
HOLD = Histogram(
    "kubepeer_proxy_hold_seconds",
    "Time a job waited for a slot or for its model to wake",
    ["model"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 900),
)
FEES = Counter("kubepeer_proxy_fees_wei_total", "Fees debited for finished jobs, in wei", ["model"])
COLD_JOBS = Counter(
    "kubepeer_proxy_cold_jobs_total",
    "Jobs that arrived while their model had no ready replica",
    ["model"],
)
DISCOVERY = Counter(
    "kubepeer_proxy_discovery_total", "GetOrchestrator calls by outcome", ["outcome"]
)


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: labels() validates and locks on each call,
    a cost on every job. Labels are models and statuses, so the cache stays small."""
    return metric.labels(*labels)
