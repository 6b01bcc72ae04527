"""The runner's HTTP API: ai-runner's routes, health and errors, over our pipelines.

`create_app` builds the app for a RunnerConfig; models load in a background thread so
/health can say LOADING meanwhile. /readyz and /livez are the kubelet's probes (no auth,
nothing revealed); every other route needs `Authorization: Bearer $AUTH_TOKEN` when set.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kubepeer_runner import __version__
from kubepeer_runner.config import ModelSpec, RunnerConfig
from kubepeer_runner.pipelines import PIPELINES
from kubepeer_runner.serving import Device, DeviceQueue, RunnerError

log = logging.getLogger("kubepeer_runner")


class Health(StrEnum):
    LOADING = "LOADING"
    OK = "OK"
    ERROR = "ERROR"
    IDLE = "IDLE"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "runner_requests_total", "Requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "runner_request_seconds", "Request latency", ["route"], registry=self.registry
        )
        self.in_flight = Gauge("runner_in_flight", "Requests in progress", registry=self.registry)
        self.load_seconds = Gauge(
            "runner_model_load_seconds", "Time to load each model", ["pipeline"],
            registry=self.registry,
        )  # fmt: skip


class Runner:
    """The state behind the routes: what is loaded, how healthy, and the device queue."""

    def __init__(self, config: RunnerConfig, device: Device) -> None:
        self.config, self.device = config, device
        self.health = Health.LOADING
        self.models: dict[str, Any] = {}
        self.queue = DeviceQueue(config.max_queue)
        self.metrics = Metrics()

    def load_all(self) -> None:
        try:
            for spec in self.config.models:
                started = time.monotonic()
                module = PIPELINES[spec.pipeline]
                self.models[spec.pipeline] = module.load(spec, self.config.model_dir, self.device)
                elapsed = time.monotonic() - started
                self.metrics.load_seconds.labels(spec.pipeline).set(elapsed)
                log.info("loaded %s %s in %.1fs", spec.pipeline, spec.model_id, elapsed)
        except Exception:
            log.exception("loading failed")
            self.health = Health.ERROR
            return
        self.health = Health.OK

    def spec(self, pipeline: str) -> ModelSpec:
        return next(s for s in self.config.models if s.pipeline == pipeline)

    def model(self, pipeline: str, requested: str | None) -> Any:
        """The loaded model for a request, or the error ai-runner would give."""
        spec = self.spec(pipeline)
        if requested and requested != spec.model_id:
            raise RunnerError(
                400, f"requested model {requested} does not match the loaded {spec.model_id}"
            )
        if self.health is not Health.OK:
            raise RunnerError(503, f"model {spec.model_id} is {self.health.value.lower()}")
        return self.models[pipeline]


def create_app(config: RunnerConfig, device: Device | None = None, load: bool = True) -> FastAPI:
    runner = Runner(config, device or Device.pick("BFLOAT16" in config.models[0].optimizations))

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        if load:  # in the device thread, where inference will run: /health says LOADING meanwhile
            runner.queue.submit(runner.load_all)
        yield

    def authorized(request: Request) -> None:
        if config.auth_token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.auth_token}".encode()):
            raise RunnerError(401, "invalid bearer token")

    app = FastAPI(
        title="Kubepeer runner",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(authorized)],
    )
    app.state.runner = runner
    probes = FastAPI()  # mounted below: outside the auth dependency

    @app.exception_handler(RunnerError)
    async def runner_error(_: Request, exc: RunnerError) -> JSONResponse:
        return JSONResponse({"detail": {"msg": exc.msg}}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def inference_failed(_: Request, exc: Exception) -> JSONResponse:
        # ai-runner answers a failed inference with 400; the runner itself carries on.
        log.exception("inference failed")
        return JSONResponse(
            {"detail": {"msg": f"inference failed: {type(exc).__name__}: {exc}"}}, status_code=400
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'query'))}: {e['msg']}"
            for e in exc.errors()
        )
        return JSONResponse({"detail": {"msg": problems}}, status_code=400)

    @app.middleware("http")
    async def measure(request: Request, call_next):  # noqa: ANN001, ANN202
        route = request.url.path.rstrip("/") or "/"
        runner.metrics.in_flight.inc()
        started = time.monotonic()
        try:
            response = await call_next(request)
        finally:
            runner.metrics.in_flight.dec()
        runner.metrics.latency.labels(route).observe(time.monotonic() - started)
        runner.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    def route(path: str, **kwargs: Any):  # noqa: ANN202 - both spellings, as ai-runner
        def register(fn):  # noqa: ANN001, ANN202
            app.get(path, **kwargs)(fn)
            app.get(path + "/", include_in_schema=False, **kwargs)(fn)
            return fn

        return register

    @route("/health")
    def health() -> dict[str, str]:
        return {"status": runner.health.value}

    @route("/version")
    def version() -> dict[str, str]:
        first = config.models[0]
        return {"pipeline": first.pipeline, "model_id": first.model_id, "version": __version__}

    @route("/hardware/info")
    def hardware_info() -> dict[str, Any]:
        first = config.models[0]
        return {"pipeline": first.pipeline, "model_id": first.model_id, "gpu_info": gpu_info()}

    @route("/hardware/stats")
    def hardware_stats() -> dict[str, Any]:
        first = config.models[0]
        return {"pipeline": first.pipeline, "model_id": first.model_id, "gpu_stats": gpu_stats()}

    @route("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(runner.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @probes.get("/readyz")
    def readyz() -> JSONResponse:
        ok = runner.health is Health.OK
        return JSONResponse({"status": runner.health.value}, status_code=200 if ok else 503)

    @probes.get("/livez")
    def livez() -> JSONResponse:
        alive = runner.health is not Health.ERROR
        return JSONResponse({"status": runner.health.value}, status_code=200 if alive else 503)

    for spec in config.models:
        PIPELINES[spec.pipeline].register(app, runner)
    app.mount("/", probes)  # last: only what no route above claims reaches it
    return app


def gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    info = {}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        info[str(i)] = {
            "id": getattr(props, "uuid", str(i)).__str__(),
            "name": props.name,
            "memory_total": total,
            "memory_free": free,
            "major": props.major,
            "minor": props.minor,
        }
    return info


def gpu_stats() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = {}
    for i in range(torch.cuda.device_count()):
        try:
            compute = torch.cuda.utilization(i)
            memory = torch.cuda.memory_usage(i)
        except Exception:
            compute, memory = 0, 0
        stats[str(i)] = {"utilization_compute": compute, "utilization_memory": memory}
    return stats
