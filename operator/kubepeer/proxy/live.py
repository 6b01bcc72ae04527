"""Live video (capability 35): a stream's start, its capacity, its payments (gateway-wire 3.5, 5.1).

`POST /live-video-to-video` in go-livepeer's order: body (400), capacity (503
`insufficient capacity`), Livepeer-Payment (402), segment credentials (403), payment (400),
balance (400 `Insufficient balance`); then the four trickle channels, the stream's watch,
the runner's start (500 and everything undone when it fails), and the reply with absolute
URLs. `POST /payment` credits a running stream and answers a PaymentResult.

Streams count against capacity in Redis (`kubepeer:live:<namespace>:<aimodel>`: a sorted
set of `<runner url> <manifest id>` -> lease expiry), so every proxy replica advertises and
enforces the same numbers. The replica that started a stream watches it: renews its lease,
debits it every `interval` seconds while input flows, and closes it (the four channels,
the lease) when its input channel is gone, its runner is gone or idle, or the balance does
not cover the time used. If that replica dies, the lease lapses within `LEASE_SECONDS`
(the capacity comes back) and the idle sweep closes the channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import aiohttp
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from kubepeer.contracts.price_table import ServedModel
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import LIVE_PIXELS_PER_SECOND, Pipeline
from kubepeer.livepeer.wire import (
    PAYMENT_HEADER,
    SEGMENT_HEADER,
    BadHeader,
    decode_payment,
    decode_segment,
)
from kubepeer.payments.ledger import manifest_id
from kubepeer.proxy import discovery, metrics
from kubepeer.proxy.admission import Door, check_credentials
from kubepeer.proxy.billing import Billing, PaymentRefused
from kubepeer.proxy.catalogue import Catalogue
from kubepeer.proxy.credentials import CredentialsRefused, check_segment
from kubepeer.proxy.jobs import (
    STORE_UNAVAILABLE,
    JobRefused,
    decode_fields,
    read_body,
    runner_error,
)
from kubepeer.proxy.trickle import BASE_PATH, TrickleStore

log = logging.getLogger("kubepeer.proxy.live")

LIVE = Pipeline.LIVE_VIDEO_TO_VIDEO
INSUFFICIENT_CAPACITY = "insufficient capacity"
PIXELS_PER_SECOND = LIVE_PIXELS_PER_SECOND  # what each elapsed second is billed as
PAYMENT_INTERVAL = 5.0  # go-livepeer's LivePaymentInterval
LEASE_SECONDS = 30.0
START_BUDGET = 4.0  # of the gateway's 5 s, what the runner call may take
HEALTH_EVERY = 2.0
HEALTH_FAILURES = 2  # unreachable this many times in a row: the runner is gone
IDLE_GRACE = 10.0  # a runner may say IDLE this long after a start before it counts
CHANNELS = (("", "video/MP2T"), ("-out", "video/MP2T"),
            ("-control", "application/json"), ("-events", "application/json"))  # fmt: skip

# Take over a stream whose watcher's lease has lapsed (its proxy replica died).
_CLAIM = """
local held = redis.call('ZSCORE', KEYS[1], ARGV[3])
if held and tonumber(held) > tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""

_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #ARGV[4]) == ARGV[4] then n = n + 1 end
end
if n >= tonumber(ARGV[5]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""


def stream_fee_pixels(seconds: float) -> int:
    """go-livepeer's processOne: pixels per second x elapsed seconds, truncated."""
    return int(PIXELS_PER_SECOND * seconds)


def channel_urls(base: str, mid: str) -> dict[str, str]:
    root = f"{base.rstrip('/')}{BASE_PATH}{mid}"
    return {
        "publish_url": root,  # the gateway publishes input here; the runner subscribes
        "subscribe_url": root + "-out",
        "control_url": root + "-control",
        "events_url": root + "-events",
    }


class LiveCapacity:
    """Streams per runner replica, counted in Redis for every proxy replica."""

    def __init__(self, redis: AsyncRedis, namespace: str,
                 lease_seconds: float = LEASE_SECONDS) -> None:  # fmt: skip
        self.redis = redis
        self.namespace = namespace
        self.lease_seconds = lease_seconds
        self._reserve = redis.register_script(_RESERVE)
        self._claim = redis.register_script(_CLAIM)

    def key(self, model: ServedModel) -> str:
        return f"kubepeer:live:{self.namespace}:{model.aimodel}"

    async def reserve(self, model: ServedModel, urls: tuple[str, ...], mid: str,
                      counts: dict[str, int]) -> str | None:  # fmt: skip
        """A runner with a free stream slot, its slot taken for `mid` (least used first, by
        `counts`); None when all are full."""
        now = time.time()
        for url in sorted(urls, key=lambda u: counts.get(u, 0)):
            args = [now, now + self.lease_seconds, f"{url} {mid}", f"{url} ", model.capacity]
            if await self._reserve(keys=[self.key(model)], args=args):
                return url
        return None

    async def renew(self, model: ServedModel, url: str, mid: str) -> None:
        await self.redis.zadd(self.key(model), {f"{url} {mid}": time.time() + self.lease_seconds})

    async def claim(self, model: ServedModel, url: str, mid: str) -> bool:
        now = time.time()
        args = [now, now + self.lease_seconds, f"{url} {mid}"]
        return bool(await self._claim(keys=[self.key(model)], args=args))

    async def release(self, model: ServedModel, url: str, mid: str) -> None:
        await self.redis.zrem(self.key(model), f"{url} {mid}")

    async def counts(self, models: Iterable[ServedModel]) -> Counts:
        """Streams per runner URL of each of `models`, by AIModel: one round trip."""
        models = list(models)
        if not models:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for model in models:
            pipe.zrangebyscore(self.key(model), now, "+inf")
        counted: Counts = {}
        for model, members in zip(models, await pipe.execute(), strict=True):
            per_url = counted.setdefault(model.aimodel, {})
            for raw in members:
                url = raw.decode().rsplit(" ", 1)[0]
                per_url[url] = per_url.get(url, 0) + 1
        return counted

    async def reserve_in(
        self, group: Sequence[tuple[ServedModel, tuple[str, ...]]], mid: str
    ) -> tuple[ServedModel, str] | None:
        """A stream slot on the AIModel of `group` (each with its ready runners) that has
        the most free slots, so streams spread over every AIModel serving a model id."""
        counts = await self.counts(model for model, _ in group)
        by_free = sorted(group, key=lambda member: -free_and_in_use(counts, *member)[0])
        for model, urls in by_free:
            runner = await self.reserve(model, urls, mid, counts.get(model.aimodel, {}))
            if runner is not None:
                return model, runner
        return None


# Streams per runner URL, by AIModel, as LiveCapacity.counts read them.
Counts = dict[str, dict[str, int]]


def free_and_in_use(counts: Counts, model: ServedModel, urls: tuple[str, ...]) -> tuple[int, int]:
    """(free stream slots, streams in use) of `model` over its ready runners `urls`."""
    per_url = counts.get(model.aimodel, {})
    in_use = sum(per_url.get(u, 0) for u in urls)
    return sum(max(0, model.capacity - per_url.get(u, 0)) for u in urls), in_use


@dataclass
class Debit:
    """One interval's charge, as go-livepeer's AccountPayment makes it."""

    seconds: float
    pixels: int
    fee_wei: int


class LedgerDoor:
    """What a stream's watch needs from billing (kept tiny so tests can see it whole)."""

    def __init__(
        self,
        balance: Callable[[bytes, str], Awaitable[int]],
        debit: Callable[[bytes, str, int], Awaitable[int]],
    ) -> None:
        self.balance = balance
        self.debit = debit


def interval_fee(pixels: int, price: Fraction) -> int:
    return -(-pixels * price.numerator // price.denominator)


def record_key(mid: str) -> str:
    return f"kubepeer:live:stream:{mid}"


def streams_key(namespace: str) -> str:
    """The manifest ids of the streams running in a namespace (for adoption)."""
    return f"kubepeer:live:streams:{namespace}"


@dataclass
class LiveStream:
    mid: str
    model: ServedModel
    runner: str
    sender: bytes | None  # None: private mode, nothing charged
    price: Fraction
    started: float
    last_charged: float
    closed: bool = False
    reason: str = ""
    task: asyncio.Task[None] | None = None


class LiveService:
    """Starts and watches streams; the Proxy hands it the live routes."""

    def __init__(
        self,
        redis: AsyncRedis,
        store: TrickleStore,
        capacity: LiveCapacity,
        *,
        public_url: str,
        runner_base_url: str | None = None,
        ledger: LedgerDoor | None = None,
        interval: float = PAYMENT_INTERVAL,
    ) -> None:
        self.redis = redis
        self.store = store
        self.capacity = capacity
        self.public_url = public_url.rstrip("/")
        self.runner_base_url = (runner_base_url or public_url).rstrip("/")
        self.ledger = ledger
        self.interval = interval
        self.streams: dict[str, LiveStream] = {}

    @staticmethod
    def new_manifest_id() -> str:
        return secrets.token_hex(8)

    async def open_channels(self, mid: str) -> None:
        for suffix, mime in CHANNELS:
            await self.store.create(mid + suffix, mime)

    async def close_channels(self, mid: str) -> None:
        for suffix, _ in CHANNELS:
            await self.store.close(mid + suffix)

    async def watch(self, stream: LiveStream, http: aiohttp.ClientSession,
                    token: str | None) -> None:  # fmt: skip
        self.streams[stream.mid] = stream
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            record_key(stream.mid),
            mapping={"aimodel": stream.model.aimodel, "runner": stream.runner,
                     "started": stream.started, "price": str(stream.price),
                     "sender": (stream.sender or b"").hex(), "debits": "[]",
                     "last_charged": stream.last_charged},
        )  # fmt: skip
        pipe.expire(record_key(stream.mid), 24 * 3600)
        pipe.sadd(streams_key(self.capacity.namespace), stream.mid)
        await pipe.execute()
        stream.task = asyncio.create_task(self._watch(stream, http, token))

    async def adopt_orphans(
        self,
        find_model: Callable[[str], ServedModel | None],
        http: aiohttp.ClientSession,
        token: str | None,
    ) -> list[str]:
        """Watch the streams whose watcher died (lease lapsed): any replica may take them."""
        adopted = []
        key = streams_key(self.capacity.namespace)
        for raw in await self.redis.smembers(key):
            mid = raw.decode()
            if mid in self.streams:
                continue
            stored = await self.redis.hgetall(record_key(mid))
            record = {k.decode(): v.decode() for k, v in stored.items()}
            if not record or "closed" in record:
                await self.redis.srem(key, mid)
                continue
            model = find_model(record["aimodel"])
            if model is None:  # the model is gone: so is the stream
                await self.close_channels(mid)
                await self.redis.srem(key, mid)
                continue
            if not await self.capacity.claim(model, record["runner"], mid):
                continue  # its watcher is alive (or another replica was quicker)
            stream = LiveStream(
                mid, model, record["runner"],
                bytes.fromhex(record["sender"]) if record["sender"] else None,
                Fraction(record["price"]), started=float(record["started"]),
                last_charged=float(record["last_charged"]),
            )  # fmt: skip
            self.streams[mid] = stream
            stream.task = asyncio.create_task(self._watch(stream, http, token))
            log.info("live stream adopted", extra={"manifest_id": mid})
            adopted.append(mid)
        return adopted

    async def close(self, stream: LiveStream, reason: str) -> None:
        if stream.closed:
            return
        stream.closed = True
        stream.reason = reason
        log.info("live stream closed", extra={"manifest_id": stream.mid, "reason": reason})
        with contextlib.suppress(Exception):  # the why first: readers see the channels go
            await self.redis.hset(record_key(stream.mid), mapping={"closed": time.time(),
                                                                    "reason": reason})  # fmt: skip
        with contextlib.suppress(Exception):  # the slot is free before anyone sees the end
            await self.capacity.release(stream.model, stream.runner, stream.mid)
            await self.redis.srem(streams_key(self.capacity.namespace), stream.mid)
        with contextlib.suppress(Exception):
            await self.close_channels(stream.mid)
        self.streams.pop(stream.mid, None)

    async def stop_all(self) -> None:
        """On shutdown: stop watching; the streams live on and are adopted elsewhere."""
        tasks = [s.task for s in self.streams.values() if s.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the watch -------------------------------------------------------------------
    async def _watch(
        self, stream: LiveStream, http: aiohttp.ClientSession, token: str | None
    ) -> None:
        try:
            reason = await self._until_over(stream, http, token)
        except asyncio.CancelledError:
            # This replica is stopping (a rollout): the stream goes on, and another replica
            # adopts it once its lease lapses.
            self.streams.pop(stream.mid, None)
            log.info("live stream left to another replica", extra={"manifest_id": stream.mid})
            return
        except Exception as exc:  # a fault here must not leave the stream half alive
            log.exception("live stream watch failed")
            reason = f"watch failed: {exc}"
        await self.close(stream, reason)

    async def _until_over(
        self, stream: LiveStream, http: aiohttp.ClientSession, token: str | None
    ) -> str:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        failures = 0
        seen_next = 0
        last_renew = time.monotonic()
        last_health = 0.0
        while not stream.closed:
            await asyncio.sleep(0.5)
            now_mono = time.monotonic()
            if now_mono - last_renew > self.capacity.lease_seconds / 3:
                await self.capacity.renew(stream.model, stream.runner, stream.mid)
                last_renew = now_mono
            nxt = await self.store.next_seq(stream.mid)
            if nxt is None:
                return "input channel closed"
            if nxt != seen_next:  # a new input segment: time to account, as go-livepeer does
                seen_next = nxt
                problem = await self.account(stream, time.time())
                if problem:
                    return problem
            if now_mono - last_health >= HEALTH_EVERY:
                last_health = now_mono
                status = await _health(http, stream.runner, headers)
                if status is None:
                    failures += 1
                    if failures >= HEALTH_FAILURES:
                        return "runner unreachable"
                else:
                    failures = 0
                    if status == "IDLE" and time.time() - stream.started > IDLE_GRACE:
                        return "runner idle"
        return stream.reason

    async def account(self, stream: LiveStream, now: float) -> str | None:
        """Charge the time since the last charge once `interval` has passed; a reason to
        close when the balance does not cover it."""
        if stream.sender is None or not stream.price or self.ledger is None:
            return None
        elapsed = now - stream.last_charged
        if elapsed < self.interval:
            return None
        pixels = stream_fee_pixels(elapsed)
        fee = interval_fee(pixels, stream.price)
        balance = await self.ledger.balance(stream.sender, stream.mid)
        if balance < fee:
            return f"insufficient balance, mid={stream.mid}, fee={fee}, balance={balance}"
        await self.ledger.debit(stream.sender, stream.mid, fee)
        stream.last_charged = now
        key = record_key(stream.mid)
        debits = json.loads(await self.redis.hget(key, "debits") or b"[]")
        debits.append({"seconds": elapsed, "pixels": pixels, "fee_wei": fee, "at": now})
        await self.redis.hset(key, mapping={"debits": json.dumps(debits), "last_charged": now})
        return None


async def adopt_forever(ctx: LiveContext, find_model: Callable[[str], ServedModel | None]) -> None:
    service = ctx.service
    while True:
        await asyncio.sleep(service.capacity.lease_seconds / 3)
        try:
            await service.adopt_orphans(find_model, ctx.http(), ctx.runner_token)
        except Exception:  # Redis away: the next pass tries again
            log.exception("adopting live streams failed")


async def _health(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str | None:
    try:
        async with http.get(
            f"{url}/health", headers=headers, timeout=aiohttp.ClientTimeout(total=HEALTH_EVERY)
        ) as reply:
            if reply.status != 200:
                return None
            body = await reply.json(content_type=None)
            return str(body.get("status", "")) if isinstance(body, dict) else None
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
        return None


def runner_request(
    fields: dict[str, Any], urls: dict[str, str], mid: str, stream_id: str, request_id: str
) -> dict[str, Any]:
    """ai-runner's LiveVideoToVideoParams: the runner subscribes to the gateway's input and
    publishes to the gateway's output (the names are the runner's point of view)."""
    return {
        "subscribe_url": urls["publish_url"],
        "publish_url": urls["subscribe_url"],
        "control_url": urls["control_url"],
        "events_url": urls["events_url"],
        "model_id": fields.get("model_id") or "",
        "params": fields.get("params") or {},
        "gateway_request_id": request_id,
        "manifest_id": mid,
        "stream_id": stream_id,
    }


def payment_result(info: net_pb2.OrchestratorInfo) -> bytes:
    return net_pb2.PaymentResult(info=info).SerializeToString()


# -- the routes --------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveContext:
    """What live video's routes need, each collaborator with one concern (as a batch job's
    `pipeline.JobContext`)."""

    service: LiveService
    door: Door  # steps 1 and 2, as for a batch job
    offered: Callable[[], discovery.Offered]  # what discovery offers now
    offer: Callable[[net_pb2.OrchestratorRequest], Awaitable[discovery.Reply]]  # params
    billing: Billing | None
    catalogue: Callable[[], Catalogue]
    urls: Callable[[ServedModel], tuple[str, ...]]  # a model's ready runners
    http: Callable[[], aiohttp.ClientSession]  # to runners (made with the event loop)
    max_body_bytes: int
    read_timeout: float
    read_idle_timeout: float
    runner_token: str | None


async def start_stream(ctx: LiveContext, request: Request) -> Response:
    """POST /live-video-to-video, as go-livepeer's StartLiveVideoToVideo answers it."""
    started = time.monotonic()
    try:
        try:
            reply = await _start(ctx, request, started)
        except RedisError as exc:  # capacity, balances and channels are out of reach
            log.warning("live start refused: Redis is unavailable (%s)", exc)
            raise JobRefused(503, STORE_UNAVAILABLE) from None
    except JobRefused as exc:
        log.info("live start refused", extra={"status": exc.status, "reason": exc.text})
        metrics.REQUESTS.labels(LIVE.value, str(exc.status)).inc()
        return PlainTextResponse(exc.text + "\n", exc.status)
    metrics.REQUESTS.labels(LIVE.value, "200").inc()
    return JSONResponse(reply)


async def _start(ctx: LiveContext, request: Request, started: float) -> dict[str, Any]:
    service = ctx.service
    body = await read_body(request, ctx.max_body_bytes, ctx.read_timeout,
                           ctx.read_idle_timeout)  # fmt: skip
    fields = await decode_fields(LIVE, "application/json", body)
    stream_id = str(fields.get("stream_id") or request.headers.get("streamID") or "")
    request_id = str(fields.get("gateway_request_id") or request.headers.get("requestID") or "")
    group = ctx.catalogue().serving(LIVE, str(fields.get("model_id") or ""))
    mid = service.new_manifest_id()
    reserved = await service.capacity.reserve_in([(m, ctx.urls(m)) for m in group], mid)
    if reserved is None:
        raise JobRefused(503, INSUFFICIENT_CAPACITY)
    model, runner = reserved
    stream: LiveStream | None = None
    try:
        payment = check_credentials(request.headers, ctx.door, ctx.offered())  # 402, 403, 401
        sender, price = None, Fraction(0)
        if payment is not None and ctx.billing is not None:
            try:
                valid = await ctx.billing.admit(  # ProcessPayment, balance
                    payment, mid, manifest_id(model.capability, model.model_id),
                    priced=model.charges(payment.sender),
                )  # fmt: skip
            except PaymentRefused as exc:
                raise JobRefused(exc.status, str(exc)) from None
            sender, price = valid.sender, valid.price
        await service.open_channels(mid)
        now = time.time()
        stream = LiveStream(mid, model, runner, sender, price, started=now, last_charged=now)
        await service.watch(stream, ctx.http(), ctx.runner_token)
        urls = channel_urls(service.public_url, mid)
        for_runner = channel_urls(service.runner_base_url, mid)
        await _start_runner(
            ctx, runner, runner_request(fields, for_runner, mid, stream_id, request_id),
            budget=START_BUDGET - (time.monotonic() - started),
        )  # fmt: skip
    except BaseException as exc:
        if stream is not None:
            await service.close(stream, f"start failed: {exc}")
        else:
            await service.capacity.release(model, runner, mid)
        raise
    log.info("live stream started",
             extra={"manifest_id": mid, "model": model.model_id, "runner": runner,
                    "stream_id": stream_id, "request_id": request_id})  # fmt: skip
    return {**urls, "manifest_id": mid}


async def _start_runner(ctx: LiveContext, runner: str, params: dict[str, Any],
                        budget: float) -> None:  # fmt: skip
    headers = {"content-type": "application/json"}
    if ctx.runner_token:
        headers["authorization"] = f"Bearer {ctx.runner_token}"
    try:
        async with ctx.http().post(
            f"{runner}/{LIVE.value}", data=json.dumps(params), headers=headers,
            timeout=aiohttp.ClientTimeout(total=max(budget, 0.5)),
        ) as reply:  # fmt: skip
            if reply.status != 200:
                raise JobRefused(500, runner_error(LIVE, reply.status, await reply.read()))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise JobRefused(500, f"{LIVE.value} container failed: {exc or 'timed out'}") from None


async def receive_payment(ctx: LiveContext, request: Request) -> Response:
    """POST /payment (segment_rpc.go Payment): credit the manifest the segment names and
    answer a PaymentResult with fresh ticket params and the session's own auth token."""
    try:
        payment = decode_payment(request.headers.get(PAYMENT_HEADER, ""))
    except BadHeader as exc:
        return PlainTextResponse(f"{exc}\n", 402)
    try:
        seg = decode_segment(request.headers.get(SEGMENT_HEADER, ""))
    except BadHeader:
        return PlainTextResponse("ErrorSegEncoding\n", 403)
    try:
        compatible = discovery.compatible(seg.capabilities, ctx.offered())
        check_segment(seg, payment.sender, ctx.door.auth_secret, compatible)
    except CredentialsRefused as exc:
        return PlainTextResponse(f"{exc}\n", 403)
    asked = net_pb2.OrchestratorRequest(address=payment.sender)
    if seg.HasField("capabilities"):
        asked.capabilities.CopyFrom(seg.capabilities)
    try:
        reply = await ctx.offer(asked)  # the same price and params discovery would give
    except PaymentRefused:
        return PlainTextResponse("Internal Server Error\n", 500)
    reply.info.auth_token.CopyFrom(seg.auth_token)
    if ctx.billing is not None:
        # Priced for the stream's model, as the segment names it (the price only matters
        # to a payment without tickets, which credits nothing here).
        priced_for = next(iter(reply.priced_for), (LIVE.capability, ""))
        try:
            await ctx.billing.credit(
                payment, seg.manifest_id.decode(errors="replace"), manifest_id(*priced_for)
            )
        except PaymentRefused as exc:
            return PlainTextResponse(f"{exc}\n", 400)
    return Response(payment_result(reply.info), media_type="application/octet-stream")
