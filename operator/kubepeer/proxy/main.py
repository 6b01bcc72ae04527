"""`kubepeer proxy`: wires the pieces to their edges (files, Redis, the API server) and serves."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis

from kubepeer import demand as demand_records
from kubepeer.payments.recipient import RecipientSecret
from kubepeer.proxy.app import Demand, Proxy, ProxyConfig, Waker
from kubepeer.proxy.billing import Billing
from kubepeer.proxy.catalogue import Catalogue, CatalogueError, ServedModel, load_catalogue
from kubepeer.proxy.credentials import AuthSecret
from kubepeer.proxy.results import ResultStore
from kubepeer.proxy.routing import Router
from kubepeer.proxy.server import hypercorn_config, serve

log = logging.getLogger("kubepeer.proxy")

RELOAD_SECONDS = 1.0


@dataclass(frozen=True)
class ProxyArgs:
    bind: str
    public_url: str
    namespace: str
    models_file: Path
    redis_url: str
    endpoints_file: Path | None = None  # a static endpoint table instead of the watch
    plaintext: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_secret_file: Path | None = None
    recipient: str | None = None
    recipient_secret_file: Path | None = None
    payments: bool = True
    bearer_token_file: Path | None = None
    runner_token_file: Path | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_queue: int = 8
    queue_timeout: float = 10.0
    hold_timeout: float = 900.0
    version: str = "0.9.1"
    wake: bool = True
    gas_price: int = 10**7  # wei: what redeeming a winning ticket is sized for
    demand_ttl: float = 60.0  # a crashed proxy's demand record dies this long after its last beat


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the request id and the other `extra` fields."""

    BASE = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in vars(record).items() if k not in self.BASE},
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


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
    """Sets spec.replicas through the AIModel's scale subresource when it reads 0."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def _wake(self, model: ServedModel) -> None:
        args = ("kubepeer.io", "v1alpha1", self.namespace, "aimodels", model.aimodel)
        aimodel = self.api.get_namespaced_custom_object(*args)
        if aimodel["spec"].get("replicas", 0) > 0:
            return
        if "replicas" in aimodel["spec"]:
            self.api.patch_namespaced_custom_object_scale(*args, {"spec": {"replicas": 1}})
        else:  # the scale subresource cannot read a field never set: set it on the object
            self.api.patch_namespaced_custom_object(*args, {"spec": {"replicas": 1}})
        log.info("woke %s: spec.replicas 0 -> 1", model.aimodel)

    async def wake(self, model: ServedModel) -> None:
        await asyncio.to_thread(self._wake, model)


class RedisDemand(Demand):
    """DESIGN.md's demand records, with an expiry this proxy keeps refreshing while it has
    jobs in flight, so a crashed proxy never pins a model on its GPU."""

    def __init__(self, redis: Redis, namespace: str, ttl: float) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl = ttl
        self.mine: dict[str, int] = {}

    def _touch(self, aimodel: str, redis: Any = None) -> None:
        key = demand_records.demand_key(self.namespace, aimodel)
        (redis or self.redis).pexpire(key, int(self.ttl * 1000))

    def _record(self, model: ServedModel, record: Callable[..., None], change: int) -> None:
        pipe = self.redis.pipeline(transaction=False)  # one round trip for the write and expiry
        record(pipe, self.namespace, model.aimodel)
        self._touch(model.aimodel, pipe)
        pipe.execute()
        self.mine[model.aimodel] = self.mine.get(model.aimodel, 0) + change

    def start(self, model: ServedModel) -> None:
        self._record(model, demand_records.record_job_start, +1)

    def end(self, model: ServedModel) -> None:
        self._record(model, demand_records.record_job_end, -1)

    def heartbeat(self) -> None:
        for aimodel, count in self.mine.items():
            if count > 0:
                self._touch(aimodel)


def _secret_bytes(path: Path | None) -> bytes | None:
    return path.read_bytes().strip() if path else None


def build(args: ProxyArgs, api_client: Any | None = None) -> tuple[Proxy, Callable[[], Any]]:
    """The Proxy and the coroutine factory that keeps its inputs current."""
    redis = Redis.from_url(args.redis_url)
    models = WatchedFile(args.models_file, lambda p: load_catalogue(p, args.namespace))
    if models.value is None:
        models.value = Catalogue(namespace=args.namespace)
    router = Router(max_queue=args.max_queue)
    auth_raw = _secret_bytes(args.auth_secret_file)
    billing = None
    recipient = b""
    if args.payments:
        if not (args.recipient and args.recipient_secret_file):
            raise SystemExit("payments on: --recipient and --recipient-secret-file are required")
        recipient = bytes.fromhex(args.recipient.removeprefix("0x"))
        billing = Billing(
            redis,
            recipient,
            RecipientSecret.from_file(args.recipient_secret_file),
            gas_price=args.gas_price,
        )
    bearer = _secret_bytes(args.bearer_token_file)
    runner_token = _secret_bytes(args.runner_token_file)
    config = ProxyConfig(
        public_url=args.public_url.rstrip("/"),
        version=args.version,
        payments=args.payments,
        bearer_token=bearer.decode() if bearer else None,
        runner_token=runner_token.decode() if runner_token else None,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        hold_timeout=args.hold_timeout,
    )
    demand = RedisDemand(redis, args.namespace, args.demand_ttl)
    synced = {"endpoints": False}
    proxy = Proxy(
        config,
        catalogue=lambda: models.value,
        router=router,
        auth_secret=AuthSecret(auth_raw) if auth_raw else AuthSecret.generate(),
        results=ResultStore(redis),
        billing=billing,
        recipient=recipient,
        waker=KubeWaker(api_client, args.namespace) if (args.wake and api_client) else None,
        demand=demand,
        ready=lambda: synced["endpoints"] and bool(models.stamp),
    )

    def apply_endpoints(table: dict[str, tuple[str, ...]]) -> None:
        router.set_endpoints(table, models.value.models)
        proxy.endpoints_changed()
        synced["endpoints"] = True

    async def keep_current() -> None:
        loop = asyncio.get_running_loop()
        endpoints_file = None
        if args.endpoints_file is not None:
            endpoints_file = WatchedFile(args.endpoints_file, read_endpoints)
            if endpoints_file.value is not None:
                apply_endpoints(endpoints_file.value)
        elif api_client is not None:
            from kubepeer.proxy.endpoints import EndpointSliceWatch

            watch = EndpointSliceWatch(
                api_client,
                args.namespace,
                lambda table: loop.call_soon_threadsafe(apply_endpoints, table),
            )
            watch.start()
        last_beat = 0.0
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            if models.refresh():
                router.serve_waiters(models.value.models)
            if endpoints_file is not None and endpoints_file.refresh():
                apply_endpoints(endpoints_file.value)
            if time.monotonic() - last_beat > args.demand_ttl / 3:
                await asyncio.to_thread(demand.heartbeat)
                last_beat = time.monotonic()

    return proxy, keep_current


def run_proxy(args: ProxyArgs) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    api_client = None
    if args.endpoints_file is None or args.wake:
        try:
            from kubernetes import config as kube_config

            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
            from kubernetes import client

            api_client = client.ApiClient()
        except Exception as exc:
            if args.endpoints_file is None:
                raise SystemExit(f"no Kubernetes API to watch EndpointSlices: {exc}") from None
            log.warning("no Kubernetes API: OnDemand models will not be woken (%s)", exc)
    proxy, keep_current = build(args, api_client)
    config = hypercorn_config(
        args.bind, args.public_url, plaintext=args.plaintext, cert=args.tls_cert, key=args.tls_key
    )

    async def main() -> None:
        keeper = asyncio.create_task(keep_current())
        try:
            await serve(proxy, config)
        finally:
            keeper.cancel()

    asyncio.run(main())
    return 0
