"""`kubepeer proxy`: wires the pieces to their edges (files, Redis, the API server) and serves."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import start_http_server
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from kubepeer.contracts.apps import ServedApp
from kubepeer.contracts.labels import LIVE_RUNNER, RUNNER, TABLE, WOKEN_AT
from kubepeer.contracts.price_table import CatalogueError, ServedModel
from kubepeer.livepeer.wire import ZERO_ADDRESS, parse_address
from kubepeer.payments.recipient import RecipientSecret
from kubepeer.proxy.app import JobLog, Proxy, ProxyConfig, Waker
from kubepeer.proxy.billing import Billing
from kubepeer.proxy.catalogue import Catalogue, ConfigMapRows, TableRows, load_catalogue
from kubepeer.proxy.credentials import AuthSecret
from kubepeer.proxy.demand_batch import BatchedDemand
from kubepeer.proxy.endpoints import ListWatch, endpoint_slice_watch
from kubepeer.proxy.live import LedgerDoor, LiveCapacity, LiveService
from kubepeer.proxy.liverunner.payments import AppPayments
from kubepeer.proxy.liverunner.proxy_urls import BadTemplate, ProxyStore, ProxyTemplate
from kubepeer.proxy.liverunner.registry import DynamicRunners
from kubepeer.proxy.liverunner.service import LiveRunnerContext, LiveRunners
from kubepeer.proxy.liverunner.sessions import SessionStore
from kubepeer.proxy.liverunner.table import AppRows, Apps, load_apps
from kubepeer.proxy.results import ResultStore
from kubepeer.proxy.routing import Router
from kubepeer.proxy.server import hypercorn_config, serve
from kubepeer.proxy.settings import ProxySettings
from kubepeer.proxy.trickle import TrickleStore

log = logging.getLogger("kubepeer.proxy")

RELOAD_SECONDS = 1.0


_stdlib_line = json.JSONEncoder(default=str).encode


def _log_line(created: float, level: str, logger: str, message: str,
              fields: dict[str, Any]) -> str:  # fmt: skip
    """One log line's JSON, the shape of every line the proxy writes; anything not JSON as its
    str(). orjson, but for what it refuses (an int past 64 bits, such as a fee in wei): the
    stdlib's encoder has no such limit."""
    entry = {"time": round(created, 3), "level": level, "logger": logger, "message": message,
             **fields}  # fmt: skip
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:
        return _stdlib_line(entry)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the request id and the other `extra` fields."""

    # A record's own attributes, and uvicorn's copy of the message with terminal colours.
    BASE = frozenset({*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "color_message"})

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in self.BASE}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        level = record.levelname.lower()
        return _log_line(record.created, level, record.name, record.getMessage(), fields)


class JobLines:
    """Each job's log line, as JsonLogFormatter writes it, straight to its handler's stream.

    One line per job is the proxy's busiest log; through `logging` each cost about three
    times the CPU (a LogRecord, the formatter's pass over it), on the event loop that serves
    the jobs. The level of `logger` still decides, and the handler's lock keeps lines whole.
    """

    def __init__(self, handler: logging.StreamHandler, logger: logging.Logger) -> None:  # type: ignore[type-arg]
        self.handler = handler
        self.logger = logger

    def __call__(self, message: str, fields: dict[str, Any]) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        line = _log_line(time.time(), "info", self.logger.name, message, fields) + "\n"
        with self.handler.lock:  # type: ignore[union-attr]
            self.handler.stream.write(line)
            self.handler.stream.flush()


class WatchedFile:
    """A mounted file (ConfigMap) read again when it changes; the last good content stays."""

    def __init__(self, path: Path, parse: Callable[[Path], Any]) -> None:
        self.path = path
        self.parse = parse
        self.stamp: tuple[int, int] | None = None
        self.value: Any = None
        self.refresh()

    def refresh(self) -> bool:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self.stamp:
            return False
        try:
            self.value = self.parse(self.path)
        except (CatalogueError, ValueError, OSError) as exc:
            log.error("ignoring %s: %s", self.path, exc)
            return False
        self.stamp = stamp
        return True


def read_endpoints(path: Path) -> dict[str, tuple[str, ...]]:
    """{"runner-service": ["http://127.0.0.1:8000", ...]}: ready URLs per runner Service."""
    raw = json.loads(path.read_text())
    return {service: tuple(urls) for service, urls in raw.items()}


class KubeWaker(Waker):
    """Wakes an OnDemand model or app as DESIGN.md's "Demand in Redis" says: a patch of the
    AIModel (or LiveRunner) with spec.replicas >= 1 and the annotation kubepeer.io/woken-at."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def _wake(self, plural: str, name: str) -> None:
        args = ("kubepeer.io", "v1alpha1", self.namespace, plural, name)
        found = self.api.get_namespaced_custom_object(*args)
        replicas = max(1, found["spec"].get("replicas") or 0)
        patch = {
            "metadata": {"annotations": {WOKEN_AT: repr(time.time())}},
            "spec": {"replicas": replicas},
        }
        self.api.patch_namespaced_custom_object(*args, patch)
        log.info("woke %s %s: spec.replicas %s", plural, name, replicas)

    async def wake(self, model: ServedModel) -> None:
        await asyncio.to_thread(self._wake, "aimodels", model.aimodel)

    async def wake_app(self, app: ServedApp) -> None:
        await asyncio.to_thread(self._wake, "liverunners", app.route)


def _secret_bytes(path: Path | None) -> bytes | None:
    return path.read_bytes().strip() if path else None


def build_live(args: ProxySettings, store: AsyncRedis, billing: Billing | None) -> LiveService:
    ledger = None
    if billing is not None:  # a stream's interval charges
        ledger = LedgerDoor(balance=billing.ledger.balance, debit=billing.ledger.charge)
    return LiveService(
        store,
        TrickleStore(AsyncRedis.from_url(args.redis_url)),
        LiveCapacity(store, args.namespace, args.live_lease_seconds),
        public_url=args.public_url,
        runner_base_url=args.trickle_url_for_runner,
        ledger=ledger,
        interval=args.live_payment_interval,
    )


def redis_pinger(redis: AsyncRedis, timeout: float = 1.0) -> Callable[[], Awaitable[bool]]:
    """Whether Redis answers PING within `timeout` s, asked off the event loop's way (a
    stopped Redis must not hold the probe, nor anything else)."""

    async def reachable() -> bool:
        try:
            return bool(await asyncio.wait_for(redis.ping(), timeout))
        except (RedisError, TimeoutError, OSError):
            return False

    return reachable


def orchestrator_address(args: ProxySettings) -> bytes:
    """OrchestratorInfo.address, always 20 bytes as go-livepeer sends it: the ticket
    recipient; with payments off, --recipient if given, else the zero address (an empty
    one matches a go-livepeer gateway's default blocklist, gateway-wire 1.5)."""
    if not args.recipient:
        return ZERO_ADDRESS
    try:
        return parse_address(args.recipient)
    except ValueError as exc:
        raise SystemExit(f"--recipient: {exc}") from None


def build(
    args: ProxySettings, api_client: Any | None = None, job_log: JobLog | None = None
) -> tuple[Proxy, Callable[[], Any]]:
    """The Proxy and the coroutine factory that keeps its inputs current."""
    # Everything on the event loop reads and writes Redis through redis.asyncio.
    store = AsyncRedis.from_url(args.redis_url, socket_timeout=args.redis_timeout,
                                socket_connect_timeout=args.redis_timeout)  # fmt: skip
    current: dict[str, Any] = {"catalogue": Catalogue(args.namespace), "models": False,
                               "endpoints": False, "apps": {}}  # fmt: skip
    models_file = None
    if args.models_file is not None:
        models_file = WatchedFile(args.models_file, lambda p: load_catalogue(p, args.namespace))
        if models_file.value is not None:
            current.update(catalogue=models_file.value, models=True)
    router = Router(max_queue=args.max_queue)
    auth_raw = _secret_bytes(args.auth_secret_file)
    billing = None
    address = orchestrator_address(args)
    if args.payments:
        if not (args.recipient and args.recipient_secret_file):
            raise SystemExit("payments on: --recipient and --recipient-secret-file are required")
        recipient = address
        billing = Billing(
            store,
            recipient,
            RecipientSecret.from_file(args.recipient_secret_file),
            gas_price=args.gas_price,
            evs_per_win=args.evs_per_win,
        )
    bearer = _secret_bytes(args.bearer_token_file)
    runner_token = _secret_bytes(args.runner_token_file)
    config = ProxyConfig(
        public_url=args.public_url.rstrip("/"),
        version=args.livepeer_version,
        payments=args.payments,
        bearer_token=bearer.decode() if bearer else None,
        runner_token=runner_token.decode() if runner_token else None,
        max_body_bytes=args.max_body_bytes,
        read_timeout=args.read_timeout,
        read_idle_timeout=args.read_idle_timeout,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        hold_timeout=args.hold_timeout,
        auto_adjust_price=args.auto_adjust_price,
        offchain_gateways=args.offchain_gateways,
        chain_refresh=args.chain_refresh,
    )
    demand = BatchedDemand(
        lambda: AsyncRedis.from_url(args.redis_url), args.namespace, args.demand_ttl
    )
    live_video = build_live(args, store, billing)
    waker = KubeWaker(api_client, args.namespace) if (args.wake and api_client) else None
    apps_file = WatchedFile(args.apps_file, load_apps) if args.apps_file else None
    if apps_file is not None and apps_file.value is not None:
        current["apps"] = apps_file.value
    auth_secret = AuthSecret(auth_raw) if auth_raw else AuthSecret.generate()
    sessions = SessionStore(store, args.namespace)
    app_payments = None
    if billing is not None:
        app_payments = AppPayments(billing, auth_secret, address, config.public_url, sessions,
                                   interval=args.live_payment_interval,
                                   lease=args.app_session_idle)  # fmt: skip
    runner_url = (args.trickle_url_for_runner or config.public_url).rstrip("/")
    registry = None
    orch_secret = _secret_bytes(args.orch_secret_file)
    if orch_secret:
        registry = DynamicRunners(store, args.namespace, live_video.store, orch_secret,
                                  runner_url, on_chain=args.payments,
                                  taken=lambda route: route in current["apps"],
                                  ttl=args.runner_heartbeat_ttl,
                                  loopback=args.loopback_runners)  # fmt: skip
    try:
        proxy_urls = ProxyTemplate.parse(args.live_runner_proxy_url
                                         or f"{config.public_url}/run/{{proxy}}")  # fmt: skip
    except BadTemplate as exc:
        raise SystemExit(f"--live-runner-proxy-url: {exc}") from None
    live_runners = LiveRunners(
        LiveRunnerContext(
            apps=lambda: current["apps"],
            urls=router.service_urls,
            sessions=sessions,
            trickle=live_video.store,
            public_url=config.public_url,
            runner_url=runner_url,
            payments=app_payments,
            registry=registry,
            proxy_urls=proxy_urls,
            proxies=ProxyStore(store, args.namespace),
            bearer_token=config.bearer_token,
            open_door=args.offchain_gateways,
            demand=demand,
            wake=waker.wake_app if waker else None,
            hold_timeout=args.hold_timeout,
            session_idle=args.app_session_idle,
            max_body_bytes=args.max_body_bytes,
        )
    )
    proxy = Proxy(
        config,
        catalogue=lambda: current["catalogue"],
        router=router,
        auth_secret=auth_secret,
        results=ResultStore(store),
        billing=billing,
        address=address,
        waker=waker,
        demand=demand,
        ready=lambda: current["endpoints"] and current["models"],
        store_reachable=redis_pinger(AsyncRedis.from_url(args.redis_url), args.redis_timeout),
        live_video=live_video,
        job_log=job_log,
        live_runners=live_runners,
    )

    watched: dict[str, dict[str, tuple[str, ...]]] = {}  # selector -> {Service: URLs}

    def apply_endpoints(table: dict[str, tuple[str, ...]], source: str = "file") -> None:
        watched[source] = table
        merged = {service: urls for part in watched.values() for service, urls in part.items()}
        router.set_endpoints(merged, current["catalogue"].models)
        proxy.endpoints_changed()
        current["endpoints"] = True

    def apply_models(catalogue: Catalogue) -> None:
        current.update(catalogue=catalogue, models=True)
        router.serve_waiters(catalogue.models)

    def apply_apps(apps: Apps) -> None:
        current["apps"] = apps
        live_runners.endpoints_changed()  # held reservations look at the new table

    async def keep_current() -> None:
        loop = asyncio.get_running_loop()
        endpoints_file = None
        if args.endpoints_file is not None:
            endpoints_file = WatchedFile(args.endpoints_file, read_endpoints)
            if endpoints_file.value is not None:
                apply_endpoints(endpoints_file.value)
        elif api_client is not None:
            for selector in (RUNNER, LIVE_RUNNER):  # runners', and Live Runner apps'
                endpoint_slice_watch(
                    api_client,
                    args.namespace,
                    lambda table, s=selector: loop.call_soon_threadsafe(apply_endpoints, table, s),
                    selector,
                ).start()
        if models_file is None and api_client is not None:
            rows = TableRows(args.namespace)
            on_rows = lambda: loop.call_soon_threadsafe(apply_models, rows.catalogue())  # noqa: E731
            table_watch(api_client, args.namespace, "model", rows, on_rows).start()
        if apps_file is None and api_client is not None:
            app_rows = AppRows()
            on_apps = lambda: loop.call_soon_threadsafe(apply_apps, app_rows.apps())  # noqa: E731
            table_watch(api_client, args.namespace, "app", app_rows, on_apps).start()
        last_beat = 0.0
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            if models_file is not None and models_file.refresh():
                apply_models(models_file.value)
            if endpoints_file is not None and endpoints_file.refresh():
                apply_endpoints(endpoints_file.value)
            if apps_file is not None and apps_file.refresh():
                apply_apps(apps_file.value)
            if time.monotonic() - last_beat > args.demand_ttl / 3:
                demand.heartbeat(m.aimodel for m in current["catalogue"].models if m.on_demand)
                last_beat = time.monotonic()

    return proxy, keep_current


def table_watch(api_client: Any, namespace: str, table: str, rows: ConfigMapRows[Any],
                on_change: Callable[[], None]) -> ListWatch:  # fmt: skip
    """A list+watch of the operator's table ConfigMaps of one kind (`kubepeer.io/table`:
    `model` or `app`) feeding `rows`."""
    from kubernetes import client

    return ListWatch(client.CoreV1Api(api_client).list_namespaced_config_map, namespace,
                     f"{TABLE}={table}", replace=rows.replace, apply=rows.apply,
                     on_change=on_change, name=f"{table}-table-watch")  # fmt: skip


def run_proxy(args: ProxySettings) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    # Our JSON lines carry none of a record's thread or process fields, so they are not
    # gathered (the logging HOWTO's "Optimization"). The job's own line skips `logging`
    # altogether (JobLines), so the caller's frame is still looked up for the rest.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    api_client = None
    if args.endpoints_file is None or args.models_file is None or args.wake:
        try:
            from kubernetes import config as kube_config

            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
            from kubernetes import client

            api_client = client.ApiClient()
        except Exception as exc:
            if args.endpoints_file is None or args.models_file is None:
                raise SystemExit(f"no Kubernetes API to watch: {exc}") from None
            log.warning("no Kubernetes API: OnDemand models will not be woken (%s)", exc)
    if args.metrics_port:
        # Never on the gateway-facing port: revenue and ticket counts are nobody else's.
        host = args.bind.rpartition(":")[0].strip("[]") or "0.0.0.0"
        start_http_server(args.metrics_port, addr=host)
    job_log = JobLines(handler, logging.getLogger("kubepeer.proxy"))
    proxy, keep_current = build(args, api_client, job_log)
    config = hypercorn_config(
        args.bind, args.public_url, plaintext=args.plaintext, cert=args.tls_cert, key=args.tls_key
    )

    async def main() -> None:
        keeper = asyncio.create_task(keep_current())
        try:
            reload = args.tls_reload if args.tls_cert and not args.plaintext else 0.0
            await serve(proxy, config, args.server, reload)
        finally:
            keeper.cancel()
            await demand_written(proxy)

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(main())
    return 0


async def demand_written(proxy: Proxy) -> None:
    """After a graceful stop: the demand records of the last jobs reach Redis."""
    if isinstance(proxy.demand, BatchedDemand):
        await proxy.demand.flushed()


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the same proxy, less CPU per job (hack/bench/proxy.py)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
