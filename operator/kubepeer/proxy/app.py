"""The proxy as one ASGI app: gRPC discovery and the HTTP routes on one port.

Thin: every decision is made by the pure modules beside it (discovery, credentials,
units, routing, results); this layer moves bytes between gateways, Redis and runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import FastAPI
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from kubepeer.contracts.price_table import ServedModel
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.wire import ZERO_ADDRESS
from kubepeer.proxy import discovery, grpc_unary, live, metrics, pipeline
from kubepeer.proxy.activation import Activation, Demand, Waits, Waker
from kubepeer.proxy.admission import Door, check_credentials
from kubepeer.proxy.billing import Billing, PaymentRefused
from kubepeer.proxy.catalogue import Catalogue
from kubepeer.proxy.credentials import AuthSecret, discovery_signed, go_address
from kubepeer.proxy.http1 import Reply, Respond, header_map
from kubepeer.proxy.jobs import (
    BATCH_PIPELINES,
    LARGE_BODY,
    STORE_UNAVAILABLE,
    JobRefused,
    declared_large,
    read_body,
)
from kubepeer.proxy.liverunner.service import LiveRunners
from kubepeer.proxy.pipeline import Job, JobContext, JobLog
from kubepeer.proxy.results import ResultStore
from kubepeer.proxy.routing import Router
from kubepeer.proxy.settings import ProxySettings
from kubepeer.proxy.trickle import BASE_PATH as TRICKLE_PATH
from kubepeer.proxy.trickle import TrickleServer, sweep_forever
from kubepeer.proxy.upstream import RunnerClient

log = logging.getLogger("kubepeer.proxy")

GET_ORCHESTRATOR = "/net.Orchestrator/GetOrchestrator"
__all__ = ["Demand", "JobLog", "Proxy", "ProxyConfig", "Waker", "header_map"]


def _logged(message: str, fields: dict[str, Any]) -> None:
    log.info(message, extra=fields)


def _default(name: str) -> Any:
    """A setting's default, written once, in ProxySettings."""
    return ProxySettings.model_fields[name].get_default(call_default_factory=True)


@dataclass(frozen=True)
class ProxyConfig:
    """What the app needs of the proxy's settings, with the secrets they name read."""

    public_url: str  # our service URI: `transcoder` in discovery, the host of result URLs
    version: str = _default("livepeer_version")  # the go-livepeer version gateways compare
    payments: bool = _default("payments")
    bearer_token: str | None = None  # payments off: what a private gateway presents
    # payments off: also admit gateways as an offchain go-livepeer does (a Livepeer-Segment
    # with an auth token from our discovery, no signature): the Livepeer gateway SDK's way
    offchain_gateways: bool = _default("offchain_gateways")
    runner_token: str | None = None  # the runners' AUTH_TOKEN
    max_body_bytes: int = _default("max_body_bytes")
    read_timeout: float = _default("read_timeout")  # head and body arrive within it, or 408
    read_idle_timeout: float = _default("read_idle_timeout")  # a body's longest pause
    max_queue: int = _default("max_queue")
    queue_timeout: float = _default("queue_timeout")
    hold_timeout: float = _default("hold_timeout")
    auto_adjust_price: bool = _default("auto_adjust_price")  # go-livepeer's -autoAdjustPrice
    chain_refresh: float = _default("chain_refresh")  # seconds between ChainFacts refreshes


async def _always() -> bool:
    return True


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        catalogue: Callable[[], Catalogue],
        router: Router,
        auth_secret: AuthSecret,
        results: ResultStore,
        billing: Billing | None = None,
        address: bytes = ZERO_ADDRESS,
        waker: Waker | None = None,
        demand: Demand | None = None,
        ready: Callable[[], bool] = lambda: True,
        store_reachable: Callable[[], Awaitable[bool]] = _always,
        live_video: live.LiveService | None = None,
        job_log: JobLog | None = None,
        live_runners: LiveRunners | None = None,
    ) -> None:
        if config.payments and billing is None:
            raise ValueError("payments are on but no billing was given")
        if len(address) != 20:
            raise ValueError(f"the orchestrator address must be 20 bytes, not {address.hex()!r}")
        self.config = config
        self.catalogue = catalogue
        self.router = router
        self.auth_secret = auth_secret
        self.results = results
        self.billing = billing
        self.address = address  # OrchestratorInfo.address: the ticket recipient, or zero
        self.activation = Activation(router, Waits(config.queue_timeout, config.hold_timeout),
                                     waker, demand)  # fmt: skip
        self.demand = self.activation.demand
        self.is_ready = ready
        self.store_reachable = store_reachable  # Redis answers: readiness needs it
        self.live = live_video  # None: live video not served (no cap 35, no trickle)
        self.job_log = job_log or _logged
        self.trickle = TrickleServer(live_video.store) if live_video else None
        self.apps = live_runners  # None: Live Runner apps not served
        self.http: aiohttp.ClientSession | None = None  # live video's client to runners
        self.runners = RunnerClient()  # batch jobs' client to runners (upstream.py)
        self._endpoints_version = 0  # bumped by endpoints_changed
        self._offered: tuple[Catalogue, int, discovery.Offered] | None = None
        self.door = Door(config.payments, auth_secret, config.bearer_token,
                         config.offchain_gateways)  # fmt: skip
        self.context = JobContext(
            door=self.door, offered=self.offered, catalogue=catalogue,
            activation=self.activation, billing=billing, runners=self.runners,
            results=results, public_url=config.public_url, runner_token=config.runner_token,
        )  # fmt: skip
        self.jobs: set[asyncio.Task[None]] = set()  # jobs in flight (pipeline.run)
        self.live_context = (
            live.LiveContext(
                service=live_video, door=self.door, offered=self.offered, offer=self.offer,
                billing=billing, catalogue=catalogue, urls=router.urls, http=self._http,
                max_body_bytes=config.max_body_bytes, read_timeout=config.read_timeout,
                read_idle_timeout=config.read_idle_timeout, runner_token=config.runner_token,
            )
            if live_video
            else None
        )  # fmt: skip
        self.http_app = self._build_http_app()
        self._job_paths = frozenset(f"/{pipeline.value}" for pipeline in BATCH_PIPELINES)
        # What http1.py serves itself on HTTP/1.1 (server.py): the job routes, whole bodies
        # up to LARGE_BODY (larger ones go through uvicorn to `job`, which checks their
        # credentials before reading them), each request whole within the read timeout.
        self.lean_jobs = (self._job_paths, min(config.max_body_bytes, LARGE_BODY),
                          self.lean_job, config.read_timeout)  # fmt: skip

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if grpc_unary.is_grpc(scope):
            await grpc_unary.serve_unary(
                scope, receive, send, {GET_ORCHESTRATOR: self.get_orchestrator}
            )
            return
        if scope["type"] == "http" and scope["path"] in self._job_paths:
            # Jobs skip the framework's middleware stack: it cost more CPU than the job's
            # own handling (hack/bench/proxy.py). Other routes go through it.
            await self._serve_job(scope, receive, send)
            return
        if self.trickle and scope["type"] == "http" and scope["path"].startswith(TRICKLE_PATH):
            await self.trickle(scope, receive, send)
            return
        if self.apps and scope["type"] != "lifespan" and self.apps.handles(scope):
            await self.apps(scope, receive, send)
            return
        await self.http_app(scope, receive, send)

    async def _serve_job(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A job through the ASGI server: HTTP/2, hypercorn, and the HTTP/1.1 requests that
        http1.py leaves to uvicorn (`lean_job` has the rest)."""
        if scope["method"] != "POST":
            await PlainTextResponse("Method Not Allowed", 405)(scope, receive, send)
            return
        request = Request(scope, receive)
        config = self.config
        reply = await self.job(
            scope["path"],
            header_map(scope["headers"]),
            lambda: read_body(
                request, config.max_body_bytes, config.read_timeout, config.read_idle_timeout
            ),
        )
        headers = {name.decode(): value.decode("latin-1") for name, value in reply.headers}
        response = (
            Response(reply.body, reply.status, headers)
            if reply.stream is None
            else StreamingResponse(reply.stream, reply.status, headers)
        )
        try:
            await response(scope, receive, send)
        finally:
            reply.sent()

    def _build_http_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30)
            self.http = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=2)
            )
            keepers = []
            if self.apps:
                await self.apps.start()
            if self.billing is not None:  # the chain view and senders' facts, in memory
                with contextlib.suppress(RedisError, OSError):
                    await self.billing.facts.refresh()
                refreshing = self.billing.facts.refresh_forever(self.config.chain_refresh)
                keepers.append(asyncio.create_task(refreshing))
            if self.live:
                adopting = live.adopt_forever(self.live_context, self._model)
                keepers += [asyncio.create_task(sweep_forever(self.live.store)),
                            asyncio.create_task(adopting)]  # fmt: skip
            try:
                yield
            finally:
                # Jobs still waiting after the server's graceful timeout: refused, their
                # slots and demand records given back before the last demand write.
                for job in list(self.jobs):
                    job.cancel()
                await asyncio.gather(*self.jobs, return_exceptions=True)
                for keeper in keepers:
                    keeper.cancel()
                if self.live:
                    await self.live.stop_all()
                if self.apps:
                    await self.apps.close()
                await self.http.close()
                self.runners.close()

        app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.router.add_route("/healthz", self.healthz, methods=["GET"])
        app.router.add_route("/readyz", self.readyz, methods=["GET"])
        app.router.add_route("/stream/{request_id}/{name}", self.stream_result, methods=["GET"])
        if self.live:
            app.router.add_route(f"/{live.LIVE.value}", self.live_start, methods=["POST"])
            app.router.add_route("/payment", self.live_payment, methods=["POST"])
        return app

    # -- discovery ---------------------------------------------------------------------
    async def _live_counts(self) -> live.Counts:
        """Streams per live runner, read once for a discovery (one round trip)."""
        if not self.live:
            return {}
        models = [m for m in self.catalogue().models if m.pipeline is live.LIVE]
        return await self.live.capacity.counts(models)

    def states(self, live_counts: live.Counts) -> Callable[[ServedModel], discovery.ModelState]:
        """What gateways are told of a model: of all the AIModels serving its (pipeline,
        model id) together, since a job or a stream for it may go to any of them. Live
        models' streams are counted in Redis (`live_counts`, read before)."""

        def state(model: ServedModel) -> discovery.ModelState:
            group = self.catalogue().serving(model.pipeline, model.model_id) or (model,)
            ready = any(self.router.ready(m) for m in group)
            if self.live and model.pipeline is live.LIVE:
                free = in_use = total = 0
                for member in group:  # stream slots are counted per AIModel, then summed
                    urls = self.router.urls(member)
                    member_free, member_in_use = live.free_and_in_use(live_counts, member, urls)
                    free, in_use = free + member_free, in_use + member_in_use
                    total += member.capacity * len(urls)
                return discovery.ModelState(
                    ready=ready,
                    free_slots=free,
                    in_use=in_use,
                    utilization=1.0 if not total else in_use / total,
                )
            return discovery.ModelState(
                ready=ready,
                free_slots=sum(self.router.free_slots(m) for m in group),
                utilization=self.router.group_utilization(group),
            )

        return state

    def offered(self) -> discovery.Offered:
        """What jobs' credentials are checked against, rebuilt only when the catalogue (a
        new object on each change) or the endpoints have changed since the last build."""
        catalogue = self.catalogue()
        built_for = (catalogue, self._endpoints_version)
        if (
            self._offered is None
            or self._offered[0] is not catalogue
            or (self._offered[1] != self._endpoints_version)
        ):
            self._offered = (*built_for, discovery.offered(catalogue, self.router.ready))
        return self._offered[2]

    async def get_orchestrator(self, raw: bytes) -> bytes:
        try:
            request = net_pb2.OrchestratorRequest.FromString(raw)
        except DecodeError as exc:
            metrics.DISCOVERY.labels("bad-request").inc()
            raise grpc_unary.GrpcError(
                grpc_unary.INTERNAL, f"grpc: error unmarshalling request: {exc}"
            ) from None
        try:
            return await self._orchestrator_info(request)
        except RedisError as exc:  # balances, prices and sender facts are out of reach
            metrics.DISCOVERY.labels("store-unavailable").inc()
            log.warning("discovery refused: Redis is unavailable (%s)", exc)
            raise grpc_unary.GrpcError(grpc_unary.UNAVAILABLE, STORE_UNAVAILABLE) from None

    async def _orchestrator_info(self, request: net_pb2.OrchestratorRequest) -> bytes:
        if self.config.payments and not discovery_signed(request):
            metrics.DISCOVERY.labels("bad-signature").inc()
            raise grpc_unary.GrpcError(
                grpc_unary.UNKNOWN,
                "Invalid orchestrator request: orchestrator req sig check failed",
            )
        state = self.states(await self._live_counts())
        if discovery.live_capped(request, self.catalogue(), state):
            metrics.DISCOVERY.labels("capped").inc()
            raise grpc_unary.GrpcError(grpc_unary.UNKNOWN, discovery.ORCHESTRATOR_CAPPED)
        try:
            if self.billing is not None:
                await self.billing.know_sender(go_address(request.address))
            reply = await self.offer(request, state)
        except PaymentRefused as exc:
            metrics.DISCOVERY.labels("no-ticket-params").inc()
            raise grpc_unary.GrpcError(grpc_unary.UNKNOWN, str(exc)) from None
        reply.info.auth_token.CopyFrom(self.auth_secret.issue())
        metrics.DISCOVERY.labels("ok").inc()
        return reply.info.SerializeToString()

    async def offer(
        self,
        request: net_pb2.OrchestratorRequest,
        state: Callable[[ServedModel], discovery.ModelState] | None = None,
    ) -> discovery.Reply:
        """OrchestratorInfo for `request.address`, its ticket params issued at the price it
        carries (AutoAdjustPrice included): what GetOrchestrator and a live stream's
        PaymentResult both answer. Raises PaymentRefused when no params can be issued."""
        state = state or self.states(await self._live_counts())
        tx_cost_share = None
        if self.billing is not None and self.config.auto_adjust_price:
            tx_cost_share = self.billing.tx_cost_share()
        reply = discovery.orchestrator_info(
            request,
            self.catalogue(),
            state,
            transcoder=self.config.public_url,
            address=self.address,
            version=self.config.version,
            tx_cost_share=tx_cost_share,
        )
        if self.billing is not None:
            params = await self.billing.ticket_params(go_address(request.address), reply.price,
                                                      reply.priced_for)  # fmt: skip
            reply.info.ticket_params.CopyFrom(params)
        return reply

    # -- live video (live.py) ------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        assert self.http is not None, "made in the lifespan"
        return self.http

    def _model(self, aimodel: str) -> ServedModel | None:
        return next((m for m in self.catalogue().models if m.aimodel == aimodel), None)

    async def live_start(self, request: Request) -> Response:
        return await live.start_stream(self.live_context, request)

    async def live_payment(self, request: Request) -> Response:
        return await live.receive_payment(self.live_context, request)

    # -- probes, metrics, results --------------------------------------------------------
    async def healthz(self, _: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(self, _: Request) -> Response:
        if not self.is_ready():
            return PlainTextResponse("not ready\n", 503)
        if not await self.store_reachable():
            return PlainTextResponse("not ready: Redis is unavailable\n", 503)
        return PlainTextResponse("ok\n")

    async def stream_result(self, request: Request) -> Response:
        found = await self.results.get(request.path_params["request_id"],
                                       request.path_params["name"])  # fmt: skip
        if found is None:
            return PlainTextResponse("not found\n", 404)
        content_type, data = found
        return Response(data, media_type=content_type)

    # -- jobs (pipeline.py) ---------------------------------------------------------------
    def lean_job(self, path: str, headers: dict[str, str], body: bytes, respond: Respond) -> None:
        """A plain HTTP/1.1 job from http1.py, its body already whole."""
        self._start(Job(path, headers, self.activation, self.job_log), body, respond)

    async def job(
        self, path: str, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]]
    ) -> Reply:
        """The answer to a batch job at `path` (`headers` by lowercased name, `header_map`),
        its body from `read()`. The job is counted and logged when the server calls the
        reply's `sent()`: off the gateway's wait."""
        answered: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def respond(reply: Reply) -> None:
            if answered.done():  # the server gave up on the request: the job ends unsent
                reply.sent()
            else:
                answered.set_result(reply)

        job = Job(path, headers, self.activation, self.job_log)
        try:
            if declared_large(headers):
                self.check_credentials(headers)  # 402, 403 (401) before buffering it
            body = await read()
        except JobRefused as exc:  # 413, 408; 402, 403
            pipeline.give(job, pipeline.refusal(job, exc), respond)
        except Exception:  # the client left mid-body, or worse
            log.exception("job failed")
            pipeline.give(job, pipeline.failure(), respond)
        else:
            self._start(job, body, respond)
        try:
            return await answered
        except asyncio.CancelledError:
            # The server gave up on the request (the client left, or its graceful timeout).
            # The job is not cancelled with it: once on a runner it runs to its end anyway,
            # and it ends (its slot back, counted) when its reply comes, unsent.
            if answered.done() and not answered.cancelled():
                answered.result().sent()  # answered, but this request is cancelled
            raise

    def _start(self, job: Job, body: bytes, respond: Respond) -> None:
        """Run the job in a task of its own, kept until it is done (the lifespan's end
        cancels those left)."""
        task = asyncio.get_running_loop().create_task(
            pipeline.run(self.context, job, body, respond))  # fmt: skip
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    def check_credentials(self, headers: Mapping[str, str]) -> net_pb2.Payment | None:
        """Steps 1 and 2 (admission.py), against what discovery offers now."""
        return check_credentials(headers, self.door, self.offered())

    def endpoints_changed(self) -> None:
        """Called when runner endpoints change: a model that became ready is awake."""
        self._endpoints_version += 1  # warm flags may have changed: `offered` is rebuilt
        self.activation.ready_again(self.catalogue().models)
        if self.apps:
            self.apps.endpoints_changed()
