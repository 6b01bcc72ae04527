"""The ASGI layer in front of every route, before any body is read: the bearer token, the
body size limit (counted while the body streams in), admission up to each model's capacity,
and metrics labelled by route template (so a scan of random paths adds one label, `other`).

It is plain ASGI rather than FastAPI dependencies because those run only after FastAPI has
read and parsed the whole body; a refused upload must cost neither the memory nor the time.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubepeer_runner.serving import RunnerError

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]


@dataclass(frozen=True)
class RoutePolicy:
    protected: bool  # needs the bearer token
    max_body_bytes: int | None = None
    pipeline: str | None = None  # admitted against this model's capacity
    # 413 where ai-runner's document gives the route one, else its 400 (go-livepeer's
    # client knows no other status for the route).
    too_large_status: int = 400


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "runner_requests_total", "Requests by route template and status",
            ["route", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "runner_request_seconds", "Request latency", ["route"], registry=self.registry
        )
        self.in_flight = Gauge(
            "runner_in_flight", "Requests admitted and not finished", ["pipeline"],
            registry=self.registry,
        )  # fmt: skip
        self.refused = Counter(
            "runner_refused_total", "Requests refused before reaching a route", ["route", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.inference = Histogram(
            "runner_inference_seconds", "Time each request held the device",
            registry=self.registry,
        )  # fmt: skip
        self.load_seconds = Gauge(
            "runner_model_load_seconds", "Time to load each model", ["pipeline"],
            registry=self.registry,
        )  # fmt: skip


class Admission:
    """Requests of each model in flight (waiting or running), up to its capacity."""

    def __init__(self, capacities: dict[str, int], metrics: Metrics) -> None:
        self.capacities = capacities
        self.in_flight = dict.fromkeys(capacities, 0)
        self.metrics = metrics

    def enter(self, pipeline: str) -> None:
        if self.in_flight[pipeline] >= self.capacities[pipeline]:
            raise RunnerError(
                500,
                f"{pipeline} is at capacity: {self.in_flight[pipeline]} requests in flight "
                f"(CAPACITY {self.capacities[pipeline]})",
            )
        self.in_flight[pipeline] += 1
        self.metrics.in_flight.labels(pipeline).inc()

    def leave(self, pipeline: str) -> None:
        self.in_flight[pipeline] -= 1
        self.metrics.in_flight.labels(pipeline).dec()


def error_response(status: int, msg: str, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": {"msg": msg}}, status_code=status, headers=headers)


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, RoutePolicy],
        auth_token: str | None,
        admission: Admission,
        metrics: Metrics,
    ) -> None:
        self.app, self.routes, self.admission, self.metrics = app, routes, admission, metrics
        self.expected = f"Bearer {auth_token}".encode() if auth_token else None

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        template = scope["path"].rstrip("/") or "/"
        policy = self.routes.get(template)
        label = template if policy else "other"
        status = [500]

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self._guarded(scope, receive, send_and_note, policy, label)
        finally:
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def _guarded(
        self, scope: Scope, receive: Callable, send: Callable, policy: RoutePolicy | None,
        label: str,
    ) -> None:  # fmt: skip
        if policy is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if policy.protected and self.expected is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.refused.labels(label, "unauthorized").inc()
                response = error_response(
                    401, "Invalid bearer token", {"WWW-Authenticate": "Bearer"}
                )
                await refuse(response, scope, receive, send)
                return
        limit = policy.max_body_bytes
        if limit is not None:
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                self.metrics.refused.labels(label, "too_large").inc()
                await refuse(too_large(policy), scope, receive, send)
                return
            receive = counting(receive, policy)
        if policy.pipeline is not None:
            try:
                self.admission.enter(policy.pipeline)
            except RunnerError as exc:
                self.metrics.refused.labels(label, "capacity").inc()
                await refuse(error_response(exc.status, exc.msg), scope, receive, send)
                return
        started = [False]

        async def send_once_started(message: dict[str, Any]) -> None:
            started[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_once_started)
        except BodyTooLarge:
            # Raised while a route read its body: answer unless the route already began to.
            if started[0]:
                raise
            await too_large(policy)(scope, receive, send)
        finally:
            if policy.pipeline is not None:
                self.admission.leave(policy.pipeline)


class BodyTooLarge(RunnerError):
    def __init__(self, policy: RoutePolicy) -> None:
        super().__init__(policy.too_large_status, too_large_message(policy))


def too_large_message(policy: RoutePolicy) -> str:
    return f"request body is larger than the {policy.max_body_bytes} bytes this route accepts"


def too_large(policy: RoutePolicy) -> Any:
    return error_response(policy.too_large_status, too_large_message(policy))


# How much of a refused body is read and thrown away so the client, still sending, reads
# the 413: a server that closes with unread data resets the connection, and the client
# loses the answer. Past this (or DRAIN_SECONDS) the connection is simply closed.
DRAIN_BYTES = 1024 * 1024 * 1024
DRAIN_SECONDS = 30.0


async def drain(receive: Callable, message: dict[str, Any] | None = None) -> None:
    drained, deadline = 0, time.monotonic() + DRAIN_SECONDS
    while message is None or (message["type"] == "http.request" and message.get("more_body")):
        if drained > DRAIN_BYTES or time.monotonic() > deadline:
            return
        message = await receive()
        drained += len(message.get("body", b""))


async def refuse(response: Any, scope: Scope, receive: Callable, send: Callable) -> None:
    """Answer without serving: the unread body is drained first, so the client gets it."""
    await drain(receive)
    await response(scope, receive, send)


def counting(receive: Callable, policy: RoutePolicy) -> Callable:
    """receive, refusing the body once more than the route's limit has arrived (the bytes
    go through one chunk at a time: nothing is kept here)."""
    seen, limit = 0, policy.max_body_bytes or 0

    async def receive_counted() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                await drain(receive, message)
                raise BodyTooLarge(policy)
        return message

    return receive_counted
