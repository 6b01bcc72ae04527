"""The proxy as the Live Runner apps' orchestrator (live-runner-wire.md 3-6): discovery,
sessions and single-shot calls, the reverse proxy to the app's replicas, and the runner's
callbacks (stop, trickle channels).

One ASGI app under the proxy's port, routed here by path (`ROUTES`). Sessions and slots
are in Redis (`sessions.py`), so any proxy replica serves any request of any session and
an app's capacity holds across replicas. An OnDemand app with no ready replica is woken
by a reservation, which is held until a replica is ready, as a batch job is.

With payments on, an app is offered at its price in wei and every reservation and
single-shot call is paid (`payments.py`: the 402 challenge, the paid retry, top-ups,
metering); with payments off (a private proxy) sessions are free, for the bearer token's
holders or, with offchain gateways admitted, for anyone, as an offchain go-livepeer.
Runners outside the cluster join by heartbeat (`registry.py`); sessions and `proxy: true`
apps get URLs of their own (`proxy_urls.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from redis.exceptions import RedisError

from kubepeer.contracts.apps import AppPrice, ServedApp
from kubepeer.contracts.demand import JOB_TTL_SECONDS, live_runner_subject
from kubepeer.contracts.price_table import INT64_MAX
from kubepeer.proxy.admission import bearer_ok
from kubepeer.proxy.http1 import header_map
from kubepeer.proxy.liverunner.payments import AppPayments, PaymentProblem, wants_challenge
from kubepeer.proxy.liverunner.proxy_urls import (
    ProxyStore,
    ProxyTemplate,
    SessionProxy,
    new_proxy_id,
)
from kubepeer.proxy.liverunner.registry import DYNAMIC, DynamicRunners
from kubepeer.proxy.liverunner.registry import Refusal as RegistrationRefused
from kubepeer.proxy.liverunner.relay import (
    SessionHeaders,
    Upstream,
    downstream_headers,
    relay_websocket,
    upstream_headers,
    upstream_url,
)
from kubepeer.proxy.liverunner.sessions import Exists, Full, Session, SessionStore
from kubepeer.proxy.liverunner.table import Apps
from kubepeer.proxy.trickle import BASE_PATH as TRICKLE_PATH
from kubepeer.proxy.trickle import TrickleStore

log = logging.getLogger("kubepeer.proxy.liverunner")

MAX_CHANNELS = 25
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
DEFAULT_MIME = "application/octet-stream"
MAX_CALLBACK_BODY = 64 * 1024  # a channels request is a few names
KEEP_EVERY = 5.0  # seconds between a running request's checks that its session still holds
SWEEP_SECONDS = 10.0  # how often expired sessions are looked for (at most)

_SEGMENT = r"([^/]+)"
ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^/discovery$"), "discovery"),
    (re.compile(rf"^/apps/{_SEGMENT}/session$"), "reserve"),
    (re.compile(rf"^/apps/{_SEGMENT}/session/{_SEGMENT}/stop$"), "client_stop"),
    (re.compile(rf"^/apps/{_SEGMENT}/session/{_SEGMENT}/payment$"), "top_up"),
    (re.compile(rf"^/apps/{_SEGMENT}/session/{_SEGMENT}/app(/.*)?$"), "session_app"),
    (re.compile(rf"^/apps/{_SEGMENT}/app(/.*)?$"), "single_shot"),
    (re.compile(rf"^/runner/{_SEGMENT}/session/{_SEGMENT}/stop$"), "runner_stop"),
    (re.compile(rf"^/runner/{_SEGMENT}/session/{_SEGMENT}/channels$"), "channels"),
    (re.compile(rf"^/runner/{_SEGMENT}/session/{_SEGMENT}/proxy$"), "create_proxy"),
    (re.compile(r"^/refresh-payment$"), "refresh_payment"),
    (re.compile(r"^/runners/heartbeat$"), "heartbeat"),
    (re.compile(rf"^/runners/{_SEGMENT}/unregister$"), "unregister"),
]
PREFIXES = ("/discovery", "/apps/", "/runner/", "/refresh-payment", "/runners/")
# The methods each route answers (the app's own routes take any): others get 405.
METHODS = {"discovery": {"GET"}, "channels": {"POST", "DELETE"}} | {
    name: {"POST"} for name in ("reserve", "client_stop", "top_up", "runner_stop",
                                "create_proxy", "refresh_payment", "heartbeat", "unregister")
}  # fmt: skip


def route_of(path: str) -> tuple[str, tuple[str | None, ...]] | None:
    """The handler's name and the path's parameters (route, session id, app path)."""
    for pattern, name in ROUTES:
        found = pattern.match(path)
        if found:
            return name, found.groups()
    return None


class Refused(Exception):
    """An answer other than the app's: status and go-livepeer's text (or, `as_json`, its
    `{"error": {"message": ...}}` body)."""

    def __init__(self, status: int, text: str, as_json: bool = False) -> None:
        super().__init__(text)
        self.status, self.text, self.as_json = status, text, as_json


# go-livepeer's common refusals: a new exception each time (a raised exception holds its
# traceback, and with it the frames of the request that raised it).
def runner_not_found() -> Refused:
    return Refused(404, "runner not found")


def session_not_found() -> Refused:
    return Refused(404, "runner session not found")


def no_capacity() -> Refused:
    return Refused(503, "no capacity available for runner")


class AppDemand(Protocol):
    """Demand records for OnDemand apps, by subject (the proxy's BatchedDemand)."""

    def start_subject(
        self, subject: str, on_demand: bool, job_id: str
    ) -> Awaitable[bool] | None: ...

    def end_subject(self, subject: str, job_id: str) -> None: ...


class NoDemand:
    """No records (a proxy without Redis for them, tests)."""

    def start_subject(self, subject: str, on_demand: bool, job_id: str) -> None:
        return None

    def end_subject(self, subject: str, job_id: str) -> None: ...


@dataclass
class LiveRunnerContext:
    """What the Live Runner routes need, each collaborator with one concern."""

    apps: Callable[[], Apps]  # the app table now
    urls: Callable[[str], tuple[str, ...]]  # an app Service's ready replica URLs
    sessions: SessionStore
    trickle: TrickleStore | None  # None: no trickle server (channels answer 404)
    public_url: str  # ServiceURI: discovery, app and control URLs, channel `url`
    runner_url: str  # LiveRunnerURI: session control, channel `internal_url`
    payments: AppPayments | None  # None: free sessions (a private proxy)
    registry: DynamicRunners | None = None  # runners that heartbeat; None: none
    proxy_urls: ProxyTemplate | None = None  # generated proxy URLs (wire 5.3)
    proxies: ProxyStore | None = None
    bearer_token: str | None = None  # payments off: what a private client presents
    open_door: bool = False  # payments off: admit anyone, as an offchain go-livepeer does
    demand: AppDemand = field(default_factory=NoDemand)
    wake: Callable[[ServedApp], Awaitable[None]] | None = None
    hold_timeout: float = 900.0  # how long a reservation waits for a cold app to wake
    session_idle: float = 600.0  # a free session unused this long is released
    max_body_bytes: int = 64 * 1024 * 1024


class LiveRunners:
    """The routes, as one ASGI app (`__call__`)."""

    def __init__(self, ctx: LiveRunnerContext) -> None:
        self.ctx = ctx
        self.upstream = Upstream()
        self._ready = asyncio.Event()  # replaced each time endpoints change
        self._waking: set[str] = set()
        self._keepers: list[asyncio.Task[None]] = []  # metering, the registry's upkeep

    async def start(self) -> None:
        self.upstream.open()
        if self.ctx.payments is not None:
            metering = self.ctx.payments.meter_forever(self._ran_dry, self._serving)
            self._keepers.append(asyncio.create_task(metering))
        every = min(SWEEP_SECONDS, self.ctx.session_idle / 2)  # a short idle, a short wait
        self._keepers.append(asyncio.create_task(self._sweep_forever(every)))
        if self.ctx.registry is not None:
            self._keepers.append(
                asyncio.create_task(self.ctx.registry.keep_forever(self.release_all)))  # fmt: skip

    async def close(self) -> None:
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        await self.upstream.close()

    def apps(self) -> Apps:
        """The operator's apps, and the runners registered by heartbeat (route: their id)."""
        if self.ctx.registry is None:
            return self.ctx.apps()
        return {**self.ctx.registry.apps(), **self.ctx.apps()}

    def urls(self, service: str) -> tuple[str, ...]:
        if service.startswith(DYNAMIC) and self.ctx.registry is not None:
            return self.ctx.registry.urls(service)
        return self.ctx.urls(service)

    async def _ran_dry(self, session: Session, why: str) -> None:
        await self.release(session.route, session.sid, why)

    def _serving(self, session: Session) -> bool:
        """Whether the session's replica still serves its app (else metering stops)."""
        app = self.apps().get(session.route)
        return app is not None and session.url in self.urls(app.runner)

    async def _sweep_forever(self, every: float = SWEEP_SECONDS) -> None:
        """Release the sessions whose lease ran out (their channels closed, their runner
        told), whichever replica finds them first (the release script is atomic)."""
        while True:
            await asyncio.sleep(every)
            try:
                for route, sid in await self.ctx.sessions.expired(list(self.apps())):
                    await self.release(route, sid, "its lease ran out")
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the next pass finds them
                log.exception("sweeping expired Live Runner sessions failed")

    def endpoints_changed(self) -> None:
        """Ready replicas changed: reservations held for a waking app look again."""
        ready, self._ready = self._ready, asyncio.Event()
        ready.set()
        for route, app in self.apps().items():
            if self.urls(app.runner):
                self._waking.discard(route)

    def handles(self, scope: dict[str, Any]) -> bool:
        """Whether a request is ours: by path, or a generated proxy URL (by host, for a
        host-form template)."""
        if scope["path"].startswith(PREFIXES):
            return True
        return self._generated(scope) is not None

    def _generated(self, scope: dict[str, Any]) -> tuple[str, str] | None:
        template = self.ctx.proxy_urls
        if template is None:
            return None
        if not template.host_form and not template.claims_path(scope["path"]):
            return None
        host = _headers(scope).get("host", "")
        return template.find(host, scope["path"])

    # -- ASGI -----------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        generated = self._generated(scope)
        routed = ("generated", (generated,)) if generated else route_of(scope["path"])
        if routed is None:
            await _refuse(scope, send, Refused(404, "404 page not found"))
            return
        name, params = routed
        if scope["type"] == "websocket" and name not in ("session_app", "single_shot",
                                                         "generated"):  # fmt: skip
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http" and scope["method"] not in METHODS.get(name, {scope["method"]}):
            await _refuse(scope, send, Refused(405, "method not allowed"))
            return
        try:
            await getattr(self, name)(scope, receive, send, *params)
        except Refused as exc:
            await _refuse(scope, send, exc)
        except PaymentProblem as exc:
            await _refuse(scope, send, Refused(exc.status, exc.text, exc.as_json))
        except _BodyTooLarge:
            await _refuse(scope, send, Refused(413, "request body too large"))
        except ConnectionResetError:
            return  # the client left: nobody to answer
        except RedisError as exc:
            log.warning("live runner request refused: Redis is unavailable (%s)", exc)
            await _refuse(scope, send, Refused(503, "the session store is unavailable"))

    # -- discovery (wire 3) -------------------------------------------------------------
    def offered(self, app: ServedApp) -> bool:
        """Whether clients are offered the app: on a private proxy, every app (free); on a
        paying one, those with a price in wei the wire can carry."""
        if self.ctx.payments is None:
            return True
        return app.price is not None and app.price.wei <= INT64_MAX

    async def discovery(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        apps = [a for a in self.apps().values() if self.offered(a)]
        used = await self.ctx.sessions.used(a.route for a in apps)
        runners = []
        for app in sorted(apps, key=lambda a: a.route):
            urls = self.urls(app.runner)
            if not urls and not app.on_demand:
                continue  # not ready: not listed (an OnDemand app is, to be woken)
            capacity = app.capacity * max(len(urls), 1)
            in_use = sum(n for url, n in used.get(app.route, {}).items() if url in urls)
            runners.append(self._listing(app, capacity, in_use))
        entry: dict[str, Any] = {"address": self.ctx.public_url}
        if runners:
            entry["runners"] = runners
        await _json(send, 200, [entry])

    def _listing(self, app: ServedApp, capacity: int, in_use: int) -> dict[str, Any]:
        base = f"{self.ctx.public_url}/apps/{app.route}"
        url = f"{base}/session" if app.persistent else f"{base}/app"
        if app.proxy and not app.persistent and self.ctx.proxy_urls is not None:
            url = self.ctx.proxy_urls.url(app.route)  # its own generated URL (wire 3)
        listing: dict[str, Any] = {
            "url": url,
            "app": app.app,
            "mode": app.mode,
            "capacity": capacity,
            "capacity_used": in_use,
            "capacity_available": capacity - in_use,
        }
        if app.version:
            listing["version"] = app.version
        if app.metadata:
            listing["metadata"] = app.metadata
        if self.ctx.payments is not None and app.price is not None:
            listing["price_info"] = {"price": app.price.wei, "currency": "wei",
                                     "unit": app.price.unit}  # fmt: skip
        return listing

    # -- sessions (wire 4) --------------------------------------------------------------
    def _app(self, route: str) -> ServedApp:
        app = self.apps().get(route)
        if app is None:
            raise runner_not_found()
        return app

    def _admit_free(self, headers: Mapping[str, str]) -> None:
        """Payments off: the bearer token's holders, or anyone with offchain gateways on."""
        if not (self.ctx.open_door or bearer_ok(headers, self.ctx.bearer_token)):
            raise Refused(401, "a valid bearer token is required")

    async def _open(self, scope: dict[str, Any], send: Any, app: ServedApp,
                    lease: float) -> Session | None:  # fmt: skip
        """A session for a reservation or a single-shot call: free; or, paid, the 402
        challenge (answered here: None) and then the paid retry (wire 7.2, 7.3)."""
        headers = _headers(scope)
        payments = self.ctx.payments
        if payments is None:
            self._admit_free(headers)
            return await self._take_slot(app, lease)
        if not self.offered(app) or app.price is None:
            raise Refused(503, "live runner price unavailable: the app has no price in wei "
                               "(see its LiveRunner's Priced condition)")  # fmt: skip
        if scope["type"] == "websocket":
            raise Refused(402, "a paid call is an HTTP request (a WebSocket goes through a "
                               "paid session's app URL)")  # fmt: skip
        if wants_challenge(headers):
            await _json(send, 402, await payments.challenge(app.route, app.price, headers))
            return None
        paid = payments.check_retry(app.price, headers)
        session = await self._take_slot(app, lease, sid=paid.sid)
        try:
            await payments.settle(paid, session, app.route, app.price)
        except BaseException:
            with contextlib.suppress(RedisError):
                await self.release(app.route, session.sid, "its payment was refused")
            raise
        return await self.ctx.sessions.get(session.sid) or session

    async def reserve(self, scope: dict[str, Any], receive: Any, send: Any, route: str) -> None:
        app = self._app(route)
        if not app.persistent:
            raise Refused(400, "only persistent runners have sessions")
        await _drain(receive, MAX_CALLBACK_BODY)  # the body is ignored
        session = await self._open(scope, send, app, self.ctx.session_idle)
        if session is None:
            return  # challenged
        try:
            await self._mark_demand(app, session.sid)
            control = f"{self.ctx.public_url}/apps/{route}/session/{session.sid}"
            app_url = f"{control}/app"
            if app.proxy and self.ctx.proxy_urls is not None:  # a default-target proxy URL
                app_url = (await self._make_proxy(session, session.url))["url"]
        except BaseException:  # nothing answered: the session (paid or not) is not kept
            with contextlib.suppress(RedisError):
                await self.release(route, session.sid, "its reservation failed")
            raise
        log.info("live runner session reserved",
                 extra={"route": route, "session": session.sid})  # fmt: skip
        await _json(send, 200, {"session_id": session.sid, "app_url": app_url,
                                "control_url": control})  # fmt: skip

    async def _mark_demand(self, app: ServedApp, job_id: str) -> None:
        """A request that counts as demand, started and ended at once (a reservation). Had
        the operator just claimed the app idle, it is woken again."""
        subject = live_runner_subject(app.route)
        woke = self.ctx.demand.start_subject(subject, app.on_demand, job_id)
        self.ctx.demand.end_subject(subject, job_id)
        if woke is not None and await woke:
            await self._wake(app, force=True)

    async def _take_slot(self, app: ServedApp, lease: float, sid: str | None = None) -> Session:
        """A slot on one of the app's ready replicas; an OnDemand app with none is woken,
        and the reservation held until one is ready (hold_timeout)."""
        deadline = time.monotonic() + self.ctx.hold_timeout
        while True:
            ready = self._ready  # before looking: a change from now on sets it
            urls = list(self.urls(app.runner))
            if urls:
                random.shuffle(urls)  # ties go anywhere: proxy replicas do not pile up
                try:
                    session = await self.ctx.sessions.reserve(
                        app.route, app.mode, urls, app.capacity, lease, sid)  # fmt: skip
                except Full:
                    raise no_capacity() from None
                except Exists:
                    raise Refused(409, "session already exists") from None
                if self.ctx.registry is not None:
                    await self.ctx.registry.send_event(app.route, "reserved", session.sid)
                return session
            if not app.on_demand:
                raise runner_not_found()
            await self._wake(app)
            left = deadline - time.monotonic()
            if left <= 0:
                raise no_capacity()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), left)
            app = self.apps().get(app.route, app)

    async def _wake(self, app: ServedApp, force: bool = False) -> None:
        """Ask for a replica once per app, however many reservations wait (`force`: again,
        the operator having just claimed it idle)."""
        if self.ctx.wake is None or (app.route in self._waking and not force):
            return
        self._waking.add(app.route)
        try:
            await self.ctx.wake(app)
        except Exception:
            self._waking.discard(app.route)
            log.exception("could not wake LiveRunner %s", app.route)
            raise no_capacity() from None

    async def release(self, route: str, sid: str, why: str) -> bool:
        """End a session: its slot freed, its channels closed. False: it was not there."""
        session = await self.ctx.sessions.release(route, sid)
        if session is None:
            return False
        if self.ctx.trickle is not None:
            for channel in session.channels:
                await self.ctx.trickle.close(channel)
        if self.ctx.proxies is not None:
            await self.ctx.proxies.drop(list(session.proxies))
        if self.ctx.registry is not None:
            await self.ctx.registry.send_event(route, "released", sid)
        log.info("live runner session released",
                 extra={"route": route, "session": sid, "why": why})  # fmt: skip
        return True

    async def release_all(self, route: str, why: str) -> None:
        """Release every session of an app (its runner went)."""
        for sid in await self.ctx.sessions.sessions_of(route):
            await self.release(route, sid, why)

    async def client_stop(self, scope: dict[str, Any], receive: Any, send: Any,
                          route: str, sid: str) -> None:  # fmt: skip
        self._app(route)
        await self.release(route, sid, "stopped by the client")
        await _empty(send, 204)

    async def top_up(self, scope: dict[str, Any], receive: Any, send: Any,
                     route: str, sid: str) -> None:  # fmt: skip
        app = self._app(route)
        session = await self.ctx.sessions.get(sid)
        if self.ctx.payments is None or app.price is None:
            raise Refused(404, "live runner payments are not taken here")
        if session is None or session.route != route:
            raise session_not_found()
        await _drain(receive, MAX_CALLBACK_BODY)
        result = await self.ctx.payments.top_up(session, route, app.price, _headers(scope))
        await _send(send, 200, result, None)

    async def refresh_payment(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.ctx.payments is None:
            raise Refused(404, "live runner payments are not taken here")
        try:
            body = json.loads(await _drain(receive, MAX_CALLBACK_BODY) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Refused(400, "invalid request body", as_json=True) from None

        def price_of(route: str) -> AppPrice | None:
            app = self.apps().get(route)
            return app.price if app else None

        await _json(send, 200, await self.ctx.payments.refresh(body, self.ctx.sessions.get,
                                                              price_of))  # fmt: skip

    # -- dynamic registration (wire 2.3) -------------------------------------------------
    async def heartbeat(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        registry = self.ctx.registry
        raw = await _drain(receive, MAX_CALLBACK_BODY)
        if registry is None:
            raise Refused(404, "dynamic live runner registration is disabled")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"invalid JSON body: {exc}") from None
        secret = _headers(scope).get("authorization", "")
        try:
            answer = await registry.heartbeat(secret, body, self.ctx.sessions.sessions_of)
        except RegistrationRefused as exc:
            raise Refused(exc.status, exc.text) from None
        await _json(send, 200, answer)

    async def unregister(self, scope: dict[str, Any], receive: Any, send: Any,
                         runner_id: str) -> None:  # fmt: skip
        await _drain(receive, MAX_CALLBACK_BODY)
        if self.ctx.registry is None:
            raise Refused(404, "runner not found")
        secret = _headers(scope).get("authorization", "")
        try:
            await self.ctx.registry.unregister(runner_id, secret)
        except RegistrationRefused as exc:
            raise Refused(exc.status, exc.text) from None
        await self.release_all(runner_id, "its runner unregistered")
        await _empty(send, 204)

    # -- the app, proxied (wire 5) ------------------------------------------------------
    async def session_app(self, scope: dict[str, Any], receive: Any, send: Any,
                          route: str, sid: str, path: str | None) -> None:  # fmt: skip
        app = self._app(route)
        session = await self._usable(app, await self.ctx.sessions.get(sid))
        if session is None:
            raise session_not_found()
        await self._proxy(scope, receive, send, app, session, path or "", self.ctx.session_idle)

    async def _usable(self, app: ServedApp, session: Session | None) -> Session | None:
        """The session, if a request may go through it now: a persistent app's (a
        single-shot call's session is its own call's alone), paid for on a paying proxy
        (not in the moment between its reservation and its payment's credit), on a replica
        still ready (else it is released, as go-livepeer releases an unhealthy runner's),
        its lease renewed."""
        if session is None or session.route != app.route or not app.persistent:
            return None
        if self.ctx.payments is not None and session.billed is None:
            return None
        if session.url not in self.urls(app.runner):
            await self.release(app.route, session.sid, "its replica is no longer ready")
            return None
        if not await self.ctx.sessions.renew(session, self.ctx.session_idle):
            return None
        return session

    async def single_shot(self, scope: dict[str, Any], receive: Any, send: Any,
                          route: str, path: str | None) -> None:  # fmt: skip
        app = self._app(route)
        if app.persistent:
            raise Refused(400, "runner is not single-shot")
        session = await self._open(scope, send, app, JOB_TTL_SECONDS)
        if session is None:
            return  # challenged
        try:
            await self._proxy(scope, receive, send, app, session, path or "", JOB_TTL_SECONDS)
        finally:
            with contextlib.suppress(RedisError):
                await self.release(route, session.sid, "the call ended")

    async def _proxy(self, scope: dict[str, Any], receive: Any, send: Any, app: ServedApp,
                     session: Session, path: str, lease: float,
                     base: str | None = None) -> None:  # fmt: skip
        """One request relayed to the session's replica, its lease renewed while it runs
        and its demand recorded from start to end."""
        subject = live_runner_subject(app.route)
        job_id = f"{session.sid}/{time.monotonic_ns()}"
        woke = self.ctx.demand.start_subject(subject, app.on_demand, job_id)
        try:
            if woke is not None and await woke:
                await self._wake(app, force=True)  # claimed idle just now: woken again
            await self._relay(scope, receive, send, app, session, path, lease, base)
        finally:
            self.ctx.demand.end_subject(subject, job_id)

    async def _relay(
        self, scope: dict[str, Any], receive: Any, send: Any, app: ServedApp, session: Session,
        path: str, lease: float, base: str | None,
    ) -> None:  # fmt: skip
        control = f"{self.ctx.runner_url}/runner/{app.route}/session/{session.sid}"
        headers = SessionHeaders(app.route, session.sid, session.token, control)
        target = upstream_url(base or session.url, path,
                              scope.get("query_string", b"").decode())  # fmt: skip
        raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]]
        if self.ctx.bearer_token:  # the credential that admitted it is not the app's to see
            admitted = f"Bearer {self.ctx.bearer_token}"
            raw = [(n, v) for n, v in raw if not (n == "authorization" and v == admitted)]
        watched = _Watched(send)
        if scope["type"] == "websocket":
            forwarded = upstream_headers(raw, headers, websocket=True)
            relaying = relay_websocket(self.upstream, target, forwarded, receive, watched,
                                       scope.get("subprotocols") or ())  # fmt: skip
        else:
            relaying = self._relay_http(scope, receive, watched, target,
                                        upstream_headers(raw, headers))  # fmt: skip
        relay = asyncio.ensure_future(relaying)
        keeper = asyncio.ensure_future(self._keep(session, lease, relay))
        try:
            await relay
        except asyncio.CancelledError:
            if not (keeper.done() and not keeper.cancelled() and keeper.result()):
                raise  # the client left, or the server stops
            # The session was released under the request (stopped, or unpaid): it ends.
            if not watched.started:
                raise session_not_found() from None
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
        finally:
            keeper.cancel()

    async def _keep(self, session: Session, lease: float, relay: asyncio.Future[None]) -> bool:
        """Renew the session's lease while its request runs; if the session is released
        meanwhile (stopped, or its balance ran dry), cut the request: True."""
        while True:
            await asyncio.sleep(min(lease / 3, KEEP_EVERY))
            try:
                alive = await self.ctx.sessions.renew(session, lease)
            except RedisError:
                continue
            if not alive:
                relay.cancel()
                return True

    async def _relay_http(self, scope: dict[str, Any], receive: Any, send: Any, target: str,
                          headers: list[tuple[str, str]]) -> None:  # fmt: skip
        body = _request_body(receive, self.ctx.max_body_bytes)
        has_body = any(n in (b"content-length", b"transfer-encoding") for n, _ in scope["headers"])
        started = False
        try:
            async with self.upstream.request(scope["method"], target, headers,
                                             body if has_body else None) as answer:  # fmt: skip
                await send({"type": "http.response.start", "status": answer.status,
                            "headers": downstream_headers(answer.headers)})  # fmt: skip
                started = True
                async for chunk in answer.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except _BodyTooLarge:
            if not started:
                raise Refused(413, "request body too large") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("live runner app unreachable: %s", exc)
            if not started:  # the app's address stays ours: discovery never shows it
                raise Refused(502, "the app did not answer") from None
            raise  # mid-body: the server drops the connection, as the app did

    # -- the runner's callbacks (wire 4.3, 6) -------------------------------------------
    async def _runner_session(self, scope: dict[str, Any], route: str, sid: str) -> Session:
        """Lookup order as go-livepeer's: runner 404, session 404, token 401."""
        if route not in self.apps():
            raise runner_not_found()
        session = await self.ctx.sessions.get(sid)
        if session is None or session.route != route:
            raise session_not_found()
        presented = _headers(scope).get("livepeer-session-token", "")
        if not hmac.compare_digest(presented.encode(), session.token.encode()):
            raise Refused(401, "invalid authorization")
        return session

    async def runner_stop(self, scope: dict[str, Any], receive: Any, send: Any,
                          route: str, sid: str) -> None:  # fmt: skip
        await self._runner_session(scope, route, sid)
        await self.release(route, sid, "stopped by the runner")
        await _empty(send, 204)

    # -- generated proxy URLs (wire 5.3) --------------------------------------------------
    async def generated(self, scope: dict[str, Any], receive: Any, send: Any,
                        found: tuple[str, str]) -> None:  # fmt: skip
        """A request at a generated URL: a session's proxy, or a `proxy: true` single-shot
        app's own URL (its route as the id)."""
        proxy_id, rest = found
        proxy = await self.ctx.proxies.get(proxy_id) if self.ctx.proxies else None
        if proxy is None:
            app = self.apps().get(proxy_id)
            if app is not None and app.proxy and not app.persistent:
                await self.single_shot(scope, receive, send, proxy_id, rest)
                return
            raise Refused(404, "live runner proxy not found")
        app = self._app(proxy.route)
        session = await self._usable(app, await self.ctx.sessions.get(proxy.sid))
        if session is None:
            await self.ctx.proxies.drop([proxy_id])  # its session is gone
            raise Refused(404, "live runner proxy not found")
        await self.ctx.proxies.touch(proxy_id)
        await self._proxy(scope, receive, send, app, session, rest, self.ctx.session_idle,
                          base=proxy.target)  # fmt: skip

    async def create_proxy(self, scope: dict[str, Any], receive: Any, send: Any,
                           route: str, sid: str) -> None:  # fmt: skip
        session = await self._runner_session(scope, route, sid)
        if self.ctx.proxy_urls is None:
            raise Refused(404, "live runner proxy URLs are not served")
        raw = await _drain(receive, MAX_CALLBACK_BODY)
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"invalid JSON body: {exc}") from None
        target = body.get("target_url") if isinstance(body, dict) else None
        if target is None:
            target = session.url
        if not isinstance(target, str):
            raise Refused(400, "target_url must be a string")
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            raise Refused(400, "target_url must be an absolute http or https URL without a "
                               "fragment")  # fmt: skip
        if parts.hostname != urlsplit(session.url).hostname:
            raise Refused(400, "target_url hostname must match registered runner_url hostname")
        await _json(send, 200, await self._make_proxy(session, target))

    async def _make_proxy(self, session: Session, target: str) -> dict[str, str]:
        assert self.ctx.proxy_urls is not None
        assert self.ctx.proxies is not None
        made = SessionProxy(new_proxy_id(), session.sid, session.route, target)
        await self.ctx.proxies.add(made)
        if not await self.ctx.sessions.add_proxy(session, made.proxy_id):
            await self.ctx.proxies.drop([made.proxy_id])
            raise session_not_found()
        return {"proxy_id": made.proxy_id, "url": self.ctx.proxy_urls.url(made.proxy_id)}

    async def channels(self, scope: dict[str, Any], receive: Any, send: Any,
                       route: str, sid: str) -> None:  # fmt: skip
        session = await self._runner_session(scope, route, sid)
        if self.ctx.trickle is None:
            raise Refused(404, "trickle channels are not served")
        try:
            body = json.loads(await _drain(receive, MAX_CALLBACK_BODY) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        if scope["method"] == "POST":
            made = await self._create_channels(session, body.get("channels"))
            await _json(send, 200, {"channels": made})
        else:
            gone = await self._delete_channels(session, body.get("channels"))
            await _json(send, 200, {"deleted": gone})

    async def _create_channels(self, session: Session, wanted: Any) -> list[dict[str, str]]:
        if not wanted:
            raise Refused(400, "channels is required")
        if not isinstance(wanted, list):
            raise Refused(400, "channels must be a list")
        if len(wanted) > MAX_CHANNELS:
            raise Refused(400, f"channels cannot contain more than {MAX_CHANNELS} entries")
        assert self.ctx.trickle is not None
        made = []
        for entry in wanted:  # an error stops the batch; channels made before it stay
            if not isinstance(entry, dict):
                raise Refused(400, "each channel must be an object with a name")
            name = str(entry.get("name") or "").strip().replace("/", "-")
            if not CHANNEL_NAME.match(name):
                raise Refused(400, f"invalid channel name {entry.get('name')!r}: letters, "
                                   "digits, '_' and '-' only")  # fmt: skip
            mime = str(entry.get("mime_type") or DEFAULT_MIME)
            channel = f"{session.sid}-{name}"
            if channel in session.channels and await self.ctx.trickle.exists(channel):
                mime = await self.ctx.trickle.mime(channel) or mime
            else:
                await self.ctx.trickle.create(channel, mime)
                if not await self.ctx.sessions.add_channel(session, channel):
                    await self.ctx.trickle.close(channel)  # released meanwhile
                    raise session_not_found()
            made.append({
                "name": name, "channel_name": channel, "mime_type": mime,
                "url": f"{self.ctx.public_url}{TRICKLE_PATH}{channel}",
                "internal_url": f"{self.ctx.runner_url}{TRICKLE_PATH}{channel}",
            })  # fmt: skip
        return made

    async def _delete_channels(self, session: Session, names: Any) -> list[str]:
        if not names or not isinstance(names, list):
            raise Refused(400, "channels is required")
        if len(names) > MAX_CHANNELS:
            raise Refused(400, f"channels cannot contain more than {MAX_CHANNELS} entries")
        assert self.ctx.trickle is not None
        for name in names:
            channel = f"{session.sid}-{str(name).strip().replace('/', '-')}"
            if channel not in session.channels or not await self.ctx.trickle.exists(channel):
                raise Refused(404, "trickle channel not found")
        for name in names:
            await self.ctx.trickle.close(f"{session.sid}-{str(name).strip().replace('/', '-')}")
        return [str(n) for n in names]


# -- ASGI plumbing -----------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class _Watched:
    """An ASGI `send` that remembers whether the answer has begun."""

    def __init__(self, send: Any) -> None:
        self.send, self.started = send, False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] in ("http.response.start", "websocket.accept"):
            self.started = True
        await self.send(message)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return header_map(scope["headers"])


async def _request_body(receive: Any, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client left mid-body")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise _BodyTooLarge
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


async def _drain(receive: Any, limit: int) -> bytes:
    parts, seen = [], 0
    async for chunk in _request_body(receive, limit):
        parts.append(chunk)
        seen += len(chunk)
    return b"".join(parts)


async def _send(send: Any, status: int, body: bytes, content_type: bytes | None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _text(send: Any, status: int, text: str) -> None:
    await _send(send, status, f"{text}\n".encode(), b"text/plain; charset=utf-8")


async def _json(send: Any, status: int, value: Any) -> None:
    await _send(send, status, json.dumps(value).encode(), b"application/json")


async def _empty(send: Any, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(scope: dict[str, Any], send: Any, exc: Refused) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": exc.text[:120]})
    elif exc.as_json:
        await _json(send, exc.status, {"error": {"message": exc.text}})
    else:
        await _text(send, exc.status, exc.text)
