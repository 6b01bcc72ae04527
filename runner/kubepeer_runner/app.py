"""The runner's HTTP API: ai-runner's routes, health and errors, over our pipelines.

`create_app` builds the app for a RunnerConfig; models load in the device thread so /health
can say LOADING meanwhile, and requests that arrive then wait for them. /health, /version,
/hardware/* and the kubelet's probes /readyz and /livez need no token (as in ai-runner);
the pipeline routes and /metrics need `Authorization: Bearer $AUTH_TOKEN` when it is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from kubepeer_runner import __version__
from kubepeer_runner.config import ModelSpec, RunnerConfig
from kubepeer_runner.guard import Admission, Guard, Metrics, RoutePolicy
from kubepeer_runner.pipelines import PIPELINES
from kubepeer_runner.serving import Device, DeviceHealth, DeviceQueue, RunnerError, classify

log = logging.getLogger("kubepeer_runner")


class Health(StrEnum):
    LOADING = "LOADING"
    OK = "OK"
    ERROR = "ERROR"
    IDLE = "IDLE"


class HealthCheck(BaseModel):
    status: Literal["LOADING", "OK", "ERROR", "IDLE"]


class Version(BaseModel):
    pipeline: str
    model_id: str
    version: str


class GPUComputeInfo(BaseModel):
    id: str
    name: str
    memory_total: int
    memory_free: int
    major: int
    minor: int


class GPUUtilizationInfo(BaseModel):
    id: str
    name: str
    memory_total: int
    memory_free: int
    utilization_compute: int
    utilization_memory: int


class HardwareInformation(BaseModel):
    pipeline: str
    model_id: str
    gpu_info: dict[str, GPUComputeInfo]


class HardwareStats(BaseModel):
    pipeline: str
    model_id: str
    gpu_stats: dict[str, GPUUtilizationInfo]


class Runner:
    """The state behind the routes: what is loaded, how healthy, and the device queue."""

    def __init__(self, config: RunnerConfig, device: Device) -> None:
        self.config, self.device, self.limits = config, device, config.limits
        self.models: dict[str, Any] = {}
        self.loaded = False
        self.load_failure: str | None = None
        self.device_health = DeviceHealth(config.limits.max_consecutive_oom)
        self.metrics = Metrics()
        self.queue = DeviceQueue(
            self.device_health, config.limits.wait_timeout_seconds, self.metrics.inference.observe
        )
        self.admission = Admission(
            {s.pipeline: config.capacity(s) for s in config.models}, self.metrics
        )
        self._load_done: asyncio.Event | None = None
        self.live: Any = None  # live-video-to-video's streams, when it is served
        self.live_only = all(s.pipeline == "live-video-to-video" for s in config.models)

    @property
    def health(self) -> Health:
        if self.load_failure or self.device_health.broken:
            return Health.ERROR
        if not self.loaded:
            return Health.LOADING
        if self.live_only and self.live is not None and not self.live.running:
            return Health.IDLE  # go-livepeer's live runners: ready, serving no stream
        return Health.OK

    @property
    def ready(self) -> bool:
        return self.health in (Health.OK, Health.IDLE)

    def start_loading(self) -> None:
        """Load every model in the device thread, where inference will run."""
        loop, self._load_done = asyncio.get_running_loop(), asyncio.Event()
        self.queue.submit(lambda: self.load_all(lambda: loop.call_soon_threadsafe(self._finished)))

    def _finished(self) -> None:
        assert self._load_done is not None
        self._load_done.set()

    def load_all(self, finished: Callable[[], object] = lambda: None) -> None:
        try:
            for spec in self.config.models:
                started = time.monotonic()
                module = PIPELINES[spec.pipeline]
                self.models[spec.pipeline] = module.load(spec, self.config.model_dir, self.device)
                elapsed = time.monotonic() - started
                self.metrics.load_seconds.labels(spec.pipeline).set(elapsed)
                log.info("loaded %s %s in %.1fs", spec.pipeline, spec.model_id, elapsed)
            self.loaded = True
        except Exception as exc:
            log.exception("loading failed")
            self.load_failure = f"{type(exc).__name__}: {exc}"
        finally:
            finished()

    def spec(self, pipeline: str) -> ModelSpec:
        return next(s for s in self.config.models if s.pipeline == pipeline)

    async def model(self, pipeline: str, requested: str | None) -> Any:
        """The loaded model for a request once it is ready, or the error ai-runner would give.

        While the models load a request waits for them (gateways count LOADING as ready and
        send work), for at most the wait timeout."""
        spec = self.spec(pipeline)
        if requested and requested != spec.model_id:
            raise RunnerError(
                400, f"pipeline configured with {spec.model_id} but called with {requested}"
            )
        if self.health is Health.LOADING and self._load_done is not None:
            timeout = self.limits.wait_timeout_seconds
            try:
                await asyncio.wait_for(self._load_done.wait(), timeout)
            except TimeoutError:
                raise RunnerError(
                    500, f"{spec.model_id} still loading after {timeout:g} s"
                ) from None
        if self.health is Health.ERROR:
            reason = self.load_failure or self.device_health.broken
            raise RunnerError(500, f"{spec.model_id} is unavailable: {reason}")
        if not self.ready:
            raise RunnerError(500, f"{spec.model_id} is {self.health.value.lower()}")
        return self.models[pipeline]


def route_policies(config: RunnerConfig) -> dict[str, RoutePolicy]:
    open_routes = ("/health", "/version", "/hardware/info", "/hardware/stats", "/readyz",
                   "/livez", "/openapi.json", "/docs")  # fmt: skip
    policies = {path: RoutePolicy(protected=False) for path in open_routes}
    policies["/metrics"] = RoutePolicy(protected=True)
    for spec in config.models:
        module = PIPELINES[spec.pipeline]
        limit = getattr(config.limits, module.BODY_LIMIT)
        too_large = getattr(module, "TOO_LARGE_STATUS", 400)
        policies["/" + spec.pipeline] = RoutePolicy(True, limit, spec.pipeline, too_large)
    return policies


def create_app(config: RunnerConfig, device: Device | None = None, load: bool = True) -> FastAPI:
    runner = Runner(config, device or Device.pick("BFLOAT16" in config.models[0].optimizations))

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        if load:
            runner.start_loading()
        yield
        if runner.live is not None:
            await runner.live.stop_all()

    app = FastAPI(
        title="Kubepeer runner",
        description=f"The Livepeer ai-runner API, served by kubepeer-runner {__version__}.",
        version=config.version,
        lifespan=lifespan,
    )
    app.state.runner = runner

    @app.exception_handler(RunnerError)
    async def runner_error(_: Request, exc: RunnerError) -> JSONResponse:
        return JSONResponse({"detail": {"msg": exc.msg}}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        error = classify(exc).error
        return JSONResponse({"detail": {"msg": error.msg}}, status_code=error.status)

    def route(path: str, **kwargs: Any):  # noqa: ANN202 - both spellings, as ai-runner
        def register(fn):  # noqa: ANN001, ANN202
            app.get(path, **kwargs)(fn)
            app.get(path + "/", **{**kwargs, "include_in_schema": False})(fn)
            return fn

        return register

    served = {spec.pipeline: spec for spec in config.models}

    def chosen(pipeline: str | None) -> ModelSpec:
        """The model a service route answers for: `?pipeline=` in a share group, else the
        first (go-livepeer asks each external container without it)."""
        if pipeline is None:
            return config.models[0]
        if pipeline not in served:
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", "pipeline"),
                        "type": "value_error",
                        "input": pipeline,
                        "msg": f"this runner serves {', '.join(served)}",
                    }
                ]
            )
        return served[pipeline]

    @route("/health", response_model=HealthCheck, operation_id="health")
    async def health() -> HealthCheck:
        return HealthCheck(status=runner.health.value)

    @route("/version", response_model=Version, operation_id="version")
    async def version(pipeline: str | None = None) -> Version:
        spec = chosen(pipeline)
        return Version(pipeline=spec.pipeline, model_id=spec.model_id, version=config.version)

    @route("/hardware/info", response_model=HardwareInformation, operation_id="hardware_info")
    def hardware_info(pipeline: str | None = None) -> HardwareInformation:
        spec = chosen(pipeline)
        return HardwareInformation(
            pipeline=spec.pipeline, model_id=spec.model_id, gpu_info=gpu_info()
        )

    @route("/hardware/stats", response_model=HardwareStats, operation_id="hardware_stats")
    def hardware_stats(pipeline: str | None = None) -> HardwareStats:
        spec = chosen(pipeline)
        return HardwareStats(pipeline=spec.pipeline, model_id=spec.model_id, gpu_stats=gpu_stats())

    @route("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(runner.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        return JSONResponse(
            {"status": runner.health.value}, status_code=200 if runner.ready else 503
        )

    @app.get("/livez", include_in_schema=False)
    async def livez() -> JSONResponse:
        alive = runner.health is not Health.ERROR
        return JSONResponse({"status": runner.health.value}, status_code=200 if alive else 503)

    for spec in config.models:
        PIPELINES[spec.pipeline].register(app, runner)
    app.add_middleware(
        Guard, routes=route_policies(config), auth_token=config.auth_token,
        admission=runner.admission, metrics=runner.metrics,
    )  # fmt: skip
    return app


def _gpus() -> list[dict[str, Any]]:
    """What both hardware routes say of each GPU: its identity and memory."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "props": props, "id": str(getattr(props, "uuid", i)),
                     "name": props.name, "memory_total": total, "memory_free": free})  # fmt: skip
    return gpus


def _identity(gpu: dict[str, Any]) -> dict[str, Any]:
    return {k: gpu[k] for k in ("id", "name", "memory_total", "memory_free")}


def gpu_info() -> dict[str, GPUComputeInfo]:
    return {
        str(g["index"]): GPUComputeInfo(
            **_identity(g), major=g["props"].major, minor=g["props"].minor
        )
        for g in _gpus()
    }


def gpu_stats() -> dict[str, GPUUtilizationInfo]:
    import torch

    stats = {}
    for g in _gpus():
        try:  # NVML through torch; absent NVML is reported as idle rather than an error
            compute = torch.cuda.utilization(g["index"])
            memory = torch.cuda.memory_usage(g["index"])
        except Exception:
            compute, memory = 0, 0
        stats[str(g["index"])] = GPUUtilizationInfo(
            **_identity(g), utilization_compute=compute, utilization_memory=memory
        )
    return stats
