"""Runners that are not pods: dynamic registration by heartbeat (live-runner-wire.md 2.3,
2.4), so SDK-embedded apps on machines outside the cluster join the same registry as the
LiveRunners the operator runs.

`parse_heartbeat` is the pure half: a heartbeat's body validated as go-livepeer validates
it, every refusal naming the field. `DynamicRunners` keeps the registry in Redis, so a
heartbeat may land on any proxy replica and every replica routes to every runner:

- `kubepeer:lr:{ns}:runner:<runner_id>` hash: `state` (the registration, JSON), `secret`
  (its heartbeat secret), `seen` (unix seconds of its last heartbeat), `o2r` (its channel);
- `kubepeer:lr:{ns}:runners` set: the runner ids.

Each replica reads the registry into memory every `REFRESH_SECONDS` (and at once after a
heartbeat it served), and sweeps every `SWEEP_SECONDS`: a runner silent for longer than
the TTL is removed by the one replica whose script still finds it expired, which closes its
o2r channel and releases its sessions. Keep-alives on each o2r channel are written by
whichever replica first claims that runner's 10 s slot.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from kubepeer.contracts.apps import AppPrice, ServedApp
from kubepeer.livepeer.price_feed import ETH_USD_KEY, reading_from, to_wei
from kubepeer.proxy.liverunner.sessions import base32, new_token
from kubepeer.proxy.trickle import BASE_PATH as TRICKLE_PATH
from kubepeer.proxy.trickle import TrickleStore

log = logging.getLogger("kubepeer.proxy.liverunner")

HEARTBEAT_INTERVAL = 5.0  # seconds, as the response says ("5s")
HEARTBEAT_TTL = 20.0  # a runner silent longer is gone
SWEEP_SECONDS = 5.0
REFRESH_SECONDS = 1.0
KEEPALIVE_SECONDS = 10.0  # o2r's {"keep": "alive"}
METADATA_BYTES = 1024
DYNAMIC = "dynamic:"  # the prefix of a dynamic runner's pseudo-Service in ServedApp.runner
O2R_MIME = "application/json"

# KEYS: runner hash, runner set. ARGV: id, secret, seen, o2r, state. Registers a new runner,
# unless one with this id is there already (then 0: the caller takes the known-id path).
_REGISTER = """
if redis.call('HSETNX', KEYS[1], 'secret', ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'seen', ARGV[3], 'o2r', ARGV[4], 'state', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
# KEYS: runner hash, runner set. ARGV: id, latest `seen` that is expired. Removes the runner
# if it is still expired; returns its o2r channel name, or false.
_EXPIRE = """
local seen = redis.call('HGET', KEYS[1], 'seen')
if seen and tonumber(seen) > tonumber(ARGV[2]) then return false end
local o2r = redis.call('HGET', KEYS[1], 'o2r')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return o2r or ''
"""


class Refusal(Exception):
    """A heartbeat or unregister refused: status and go-livepeer's text."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


@dataclass(frozen=True)
class Registration:
    """A runner's full state as its heartbeat states it (wire 2.3), normalized."""

    runner_id: str
    label: str
    proxy: bool
    runner_url: str
    version: str
    metadata: str
    status: str
    mode: str
    gpu: dict[str, Any] | None
    app: str
    capacity: int
    price: dict[str, str] | None  # {"price": decimal text, "currency": "usd", "unit"}

    @property
    def ready(self) -> bool:
        return self.status in ("", "ready")


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Refusal(400, f"{name} must be a string")
    return value


def parse_heartbeat(body: Any, on_chain: bool, loopback: bool = False) -> Registration:
    """The heartbeat's state, or Refusal(400, reason) naming the field (wire 2.1, 2.3).
    `loopback`: runners on the proxy's own host are allowed (one-machine setups, tests)."""
    if not isinstance(body, dict):
        raise Refusal(400, "the body must be a JSON object")
    runner_url = _text(body, "runner_url")
    parts = urlsplit(runner_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refusal(400, f"runner_url must be an absolute http or https URL, not "
                           f"{runner_url!r}")  # fmt: skip
    if _never_a_runner(parts.hostname, loopback):
        raise Refusal(400, f"runner_url must not point at {parts.hostname} (the proxy's own "
                           "host, link-local or metadata addresses)")  # fmt: skip
    app = _text(body, "app")
    if not app or app != app.strip():
        raise Refusal(400, "app is required, without surrounding spaces")
    metadata = _text(body, "metadata")
    if len(metadata.encode()) > METADATA_BYTES:
        raise Refusal(400, f"metadata must be at most {METADATA_BYTES} bytes")
    if "\ufffd" in metadata:
        raise Refusal(400, "metadata must be valid UTF-8")
    status = _text(body, "status")
    if status != status.strip().lower():
        raise Refusal(400, f"status must be lowercase and trimmed, not {status!r}")
    mode = _text(body, "mode") or "persistent"
    mode = "single-shot" if mode == "single_shot" else mode
    if mode not in ("persistent", "single-shot"):
        raise Refusal(400, f"mode must be persistent or single-shot, not {mode!r}")
    capacity = body.get("capacity", 0)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise Refusal(400, f"capacity must be a whole number of at least 0, not {capacity!r}")
    runner_id = _text(body, "runner_id").strip()
    if "/" in runner_id or runner_id != runner_id.strip():
        raise Refusal(400, f"runner_id must not hold '/', not {runner_id!r}")
    proxy = body.get("proxy", False)
    if not isinstance(proxy, bool):
        raise Refusal(400, "proxy must be true or false")
    return Registration(
        runner_id=runner_id, label=_text(body, "label"), proxy=proxy, runner_url=runner_url,
        version=_text(body, "version"), metadata=metadata, status=status, mode=mode,
        gpu=_gpu(body.get("gpu")), app=app, capacity=capacity or 1,
        price=_price_info(body.get("price_info")) if on_chain else None,
    )  # fmt: skip


def _never_a_runner(host: str, loopback: bool) -> bool:
    """Addresses a registered runner may not name: the proxy would reach its own host or a
    cloud metadata service for whoever holds a session (the proxy relays to runner_url).
    Names are not resolved here: a name that resolves to one of these is the orchestrator
    secret holder's doing."""
    if host.lower() == "metadata.google.internal" or (host.lower() == "localhost"
                                                      and not loopback):  # fmt: skip
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ((address.is_loopback and not loopback) or address.is_link_local
            or address.is_unspecified or address.is_multicast)  # fmt: skip


def _gpu(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise Refusal(400, "gpu must be an object {id, name, vram_mb} or a device index")
    if isinstance(raw, int):
        return {"id": str(raw)}  # a local device index: its name is the runner host's
    if not isinstance(raw, dict):
        raise Refusal(400, "gpu must be an object {id, name, vram_mb} or a device index")
    gpu = {k: raw[k] for k in ("id", "name", "vram_mb") if raw.get(k) not in (None, "")}
    if not all(isinstance(gpu.get(k, ""), str) for k in ("id", "name")) or isinstance(
        gpu.get("vram_mb", 0), bool) or not isinstance(gpu.get("vram_mb", 0), int):  # fmt: skip
        raise Refusal(400, "gpu must be {id: string, name: string, vram_mb: integer}")
    return gpu or None


def _price_info(raw: Any) -> dict[str, str]:
    """On-chain: a positive price in USD per hour, per 720p or fixed (LR's rules)."""
    if not isinstance(raw, dict):
        raise Refusal(400, "price_info.price must be a positive decimal")
    price = raw.get("price")
    try:
        if isinstance(price, bool) or not isinstance(price, (int, float, str)):
            raise InvalidOperation
        amount = Decimal(str(price).strip())
    except InvalidOperation:
        raise Refusal(400, "price_info.price must be a positive decimal") from None
    if not amount.is_finite() or amount <= 0:
        raise Refusal(400, "price_info.price must be a positive decimal")
    currency = str(raw.get("currency") or "usd").strip().lower()
    if currency != "usd":
        raise Refusal(400, f"price_info.currency must be usd, not {currency!r}")
    unit = str(raw.get("unit") or "hour").strip().lower()
    if unit not in ("hour", "720p", "fixed"):
        raise Refusal(400, f"price_info.unit must be hour, 720p or fixed, not {unit!r}")
    return {"price": str(amount), "currency": currency, "unit": unit}


@dataclass(frozen=True)
class Known:
    """A registered runner as a replica last read it."""

    registration: Registration
    seen: float
    o2r: str


def o2r_event(event: str, session: str, now: float | None = None) -> bytes:
    """An o2r message (wire 2.4): RFC 3339 UTC, nanoseconds, trailing zeros trimmed."""
    at = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    fraction = f"{at.microsecond:06d}000".rstrip("0")
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"
    return json.dumps({"event": event, "session": session, "timestamp": stamp}).encode()


class DynamicRunners:
    def __init__(self, redis: Redis, namespace: str, trickle: TrickleStore | None,
                 orch_secret: bytes | None, runner_url: str, on_chain: bool,
                 taken: Callable[[str], bool], ttl: float = HEARTBEAT_TTL,
                 loopback: bool = False) -> None:  # fmt: skip
        self.redis = redis
        self.prefix = f"kubepeer:lr:{namespace}"
        self.trickle = trickle
        self.orch_secret = orch_secret  # None: registration disabled
        self.runner_url = runner_url  # LiveRunnerURI: the `orchestrator` and o2r URLs
        self.on_chain = on_chain
        self.taken = taken  # whether a route is an operator app's
        self.ttl = ttl  # a runner silent longer is gone
        self.loopback = loopback  # runners on this host allowed
        self.known: dict[str, Known] = {}
        self._register = redis.register_script(_REGISTER)
        self._expire = redis.register_script(_EXPIRE)
        self.eth_usd: Any = None  # the last ETH/USD reading (USD prices in wei)

    def key(self, runner_id: str) -> str:
        return f"{self.prefix}:runner:{runner_id}"

    @property
    def set_key(self) -> str:
        return f"{self.prefix}:runners"

    # -- what routing sees --------------------------------------------------------------
    def alive(self, runner_id: str, now: float | None = None) -> Known | None:
        """A registered runner that has not gone silent past the TTL."""
        found = self.known.get(runner_id)
        if found is None or (time.time() if now is None else now) - found.seen > self.ttl:
            return None
        return found

    def apps(self) -> dict[str, ServedApp]:
        """The ready runners as apps (route = runner id), priced in wei where they can be."""
        apps = {}
        for runner_id in list(self.known):
            found = self.alive(runner_id)
            if found is None or not found.registration.ready:
                continue
            r = found.registration
            apps[runner_id] = ServedApp(
                route=runner_id, app=r.app, mode=r.mode, runner=DYNAMIC + runner_id, port=0,
                capacity=r.capacity, on_demand=False, max_replicas=1, proxy=r.proxy,
                metadata=r.metadata or None, version=r.version or None, price=self._wei(r),
            )  # fmt: skip
        return apps

    def urls(self, service: str) -> tuple[str, ...]:
        found = self.alive(service.removeprefix(DYNAMIC))
        return (found.registration.runner_url,) if found and found.registration.ready else ()

    def _wei(self, registration: Registration) -> AppPrice | None:
        price = registration.price
        if price is None:
            return None
        wei = to_wei(Decimal(price["price"]), "USD", price["unit"], self.eth_usd)
        return None if wei is None else AppPrice(wei=wei.price, unit=wei.unit)

    async def refresh(self) -> None:
        """Read the registry (and the ETH/USD reading) into memory: one round trip each."""
        ids = [i.decode() for i in await self.redis.smembers(self.set_key)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner_id in ids:
                pipe.hmget(self.key(runner_id), "state", "seen", "o2r")
            pipe.hgetall(ETH_USD_KEY)
            replies = await pipe.execute()
        known = {}
        for runner_id, (state, seen, o2r) in zip(ids, replies[:-1], strict=True):
            if state is None or seen is None:
                continue
            registration = Registration(**json.loads(state))
            known[runner_id] = Known(registration, float(seen), (o2r or b"").decode())
        self.known = known
        self.eth_usd = reading_from(replies[-1])

    # -- the heartbeat (2.3) ------------------------------------------------------------
    async def heartbeat(
        self, secret: str, body: Any, sessions: Callable[[str], Awaitable[list[str]]]
    ) -> dict[str, Any]:
        """A heartbeat's answer, or Refusal. `sessions(route)`: its live session ids."""
        registration = parse_heartbeat(body, self.on_chain, self.loopback)
        runner_id = registration.runner_id or "runner_" + base32(secrets.token_bytes(5))
        registration = replace(registration, runner_id=runner_id)
        if self.taken(runner_id):
            raise Refusal(400, f"runner_id {runner_id!r} is the route of a LiveRunner here")
        now = time.time()
        stored = await self.redis.hmget(self.key(runner_id), "secret", "seen", "o2r")
        answer: dict[str, Any] = {
            "runner_id": runner_id, "orchestrator": self.runner_url,
            "heartbeat_interval": f"{HEARTBEAT_INTERVAL:g}s",
            "heartbeat_ttl": f"{self.ttl:g}s",
        }  # fmt: skip
        if stored[0] is None:
            if self.orch_secret is None:
                raise Refusal(404, "dynamic live runner registration is disabled")
            if not hmac.compare_digest(secret.encode(), self.orch_secret):
                raise Refusal(401, "invalid registration authorization")
            heartbeat_secret = new_token()
            o2r = f"{runner_id}-{base32(secrets.token_bytes(10))[:16]}-o2r"
            state = json.dumps(asdict(registration))
            made = await self._register(
                keys=[self.key(runner_id), self.set_key],
                args=[runner_id, heartbeat_secret, repr(now), o2r, state],
            )
            if not made:  # registered by another heartbeat just now
                return await self.heartbeat(secret, body, sessions)
            if self.trickle is not None:
                await self.trickle.create(o2r, O2R_MIME)
            answer["heartbeat_secret"] = heartbeat_secret
            answer["o2r"] = {"name": "o2r", "channel_name": o2r, "mime_type": O2R_MIME,
                             "url": f"{self.runner_url}{TRICKLE_PATH}{o2r}"}  # fmt: skip
            log.info("live runner registered", extra={"runner": runner_id, "app": registration.app})
        else:
            if now - float(stored[1] or 0) > self.ttl:
                raise Refusal(404, "runner not found")  # silent too long; not yet swept
            if not hmac.compare_digest(secret.encode(), stored[0]):
                raise Refusal(401, "invalid heartbeat authorization")
            await self.redis.hset(self.key(runner_id), mapping={
                "seen": repr(now), "state": json.dumps(asdict(registration))})  # fmt: skip
            o2r = (stored[2] or b"").decode()
        # Routable on this replica at once (the others read it within REFRESH_SECONDS).
        self.known[runner_id] = Known(registration, now, o2r)
        answer["session_ids"] = await sessions(runner_id)
        return answer

    async def unregister(self, runner_id: str, secret: str) -> str:
        """Remove a runner at its own request (wire 2.3); its o2r channel, or Refusal."""
        stored = await self.redis.hmget(self.key(runner_id), "secret", "seen")
        if stored[0] is None or time.time() - float(stored[1] or 0) > self.ttl:
            raise Refusal(404, "runner not found")
        if not hmac.compare_digest(secret.encode(), stored[0]):
            raise Refusal(401, "invalid authorization")
        return await self.remove(runner_id, expired_before=float("inf")) or ""

    async def remove(self, runner_id: str, expired_before: float) -> str | None:
        """Remove the runner if its last heartbeat is before `expired_before`: its o2r
        channel ('' if none), or None when it was not removed (alive, or gone already)."""
        o2r = await self._expire(keys=[self.key(runner_id), self.set_key],
                                 args=[runner_id, repr(expired_before)])  # fmt: skip
        if o2r is None:
            return None
        self.known.pop(runner_id, None)
        if o2r and self.trickle is not None:
            await self.trickle.close(o2r.decode())
        return o2r.decode() if o2r else ""

    async def expired(self, now: float) -> list[str]:
        """Remove every runner silent past the TTL; the ids this replica removed."""
        gone = []
        for runner_id in [i.decode() for i in await self.redis.smembers(self.set_key)]:
            if await self.remove(runner_id, expired_before=now - self.ttl) is not None:
                gone.append(runner_id)
        return gone

    # -- o2r (2.4) ----------------------------------------------------------------------
    async def send_event(self, runner_id: str, event: str, session: str) -> None:
        found = self.known.get(runner_id)
        if found is not None and found.o2r and self.trickle is not None:
            await self.trickle.write_segment(found.o2r, o2r_event(event, session))

    async def keepalives(self, runner_ids: Iterable[str]) -> None:
        """`{"keep": "alive"}` on each runner's o2r channel every 10 s, from one replica."""
        if self.trickle is None:
            return
        for runner_id in runner_ids:
            found = self.alive(runner_id)
            claim = f"{self.prefix}:o2r-keepalive:{runner_id}"
            if found and found.o2r and await self.redis.set(claim, 1, nx=True,
                                                            ex=int(KEEPALIVE_SECONDS)):  # fmt: skip
                await self.trickle.write_segment(found.o2r, b'{"keep":"alive"}')

    async def keep_forever(self, release_all: Callable[[str, str], Awaitable[None]]) -> None:
        """Refresh the registry every second; sweep the silent every five; keep-alives."""
        last_sweep = 0.0
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
                now = time.time()
                if now - last_sweep >= SWEEP_SECONDS:
                    last_sweep = now
                    for runner_id in await self.expired(now):
                        await release_all(runner_id, "its runner stopped sending heartbeats")
                    await self.keepalives(list(self.known))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the registry stays as last read
                log.exception("the Live Runner registry could not be read; trying again")
