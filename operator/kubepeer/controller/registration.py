"""Kubepeer under an existing go-livepeer orchestrator: every Ready replica of a LiveRunner
that names one in `registerWith` is registered with it by heartbeat and kept alive
(live-runner-wire.md 2.3), so the orchestrator's registry lists the cluster's apps.

Where it runs: in the operator (DESIGN.md, "Registration with external orchestrators"):
one asyncio task on kopf's loop, one kept-alive HTTP connection pool per orchestrator,
every replica's heartbeat on its own clock. The orchestrator secret is read from a Secret
by the operator alone (RBAC names the Secrets it may read); no pod ever holds it.

- A Ready replica (a pod with an address and the Ready condition) is registered with the
  orchestrator secret, then kept alive with the heartbeat secret the answer gave, at the
  interval it gave; its id is `<namespace>.<pod>`.
- A replica that stops being Ready, is deleted or is scaled away is unregistered at once.
- A heartbeat answered 401 or 404 (the orchestrator restarted, or the runner expired) is
  forgotten and the replica registered again on its next turn, without a restart.
- Each LiveRunner's status says, per orchestrator, how many replicas are registered, the
  last heartbeat that succeeded and the last error.

`heartbeat_body` and `ready_replicas` are pure.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import aiohttp

from kubepeer.api.live_runner import ExternalOrchestrator, LiveRunnerSpec, Registration
from kubepeer.api.pricing import AppCurrency, AppPrice
from kubepeer.livepeer.price_feed import WEI_PER_ETH, EthUsd

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0  # until an orchestrator says otherwise (go-livepeer's "5s")
STORE_KEY = "kubepeer:registrations"  # Redis hash: "<url> <runner id>" -> what is held
# After a restart, registrations read back from the store wait this long to be seen wanted
# (kopf's indices fill in the meantime) before one that is not is unregistered.
SETTLE_SECONDS = 30.0
TIMEOUT = 5.0
Key = tuple[str, str]  # (namespace, app Deployment)


@dataclass(frozen=True)
class Replica:
    pod: str
    ip: str
    node: str | None


def ready_replicas(pods: list[Mapping[str, Any]]) -> list[Replica]:
    """The pods with an address whose Ready condition is True and that are not being
    deleted (a terminating pod leaves at once: its sessions must not start), from the
    index's summaries."""
    ready = []
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if status.get("podIP") and conditions.get("Ready") == "True":
            ready.append(Replica(pod["metadata"]["name"], status["podIP"],
                                 (pod.get("spec") or {}).get("nodeName")))  # fmt: skip
    return sorted(ready, key=lambda r: r.pod)


def runner_url(template: str, namespace: str, replica: Replica, port: int) -> str:
    host = f"[{replica.ip}]" if ":" in replica.ip else replica.ip
    return (template.replace("{podIP}", host).replace("{pod}", replica.pod)
            .replace("{namespace}", namespace).replace("{port}", str(port)))  # fmt: skip


def price_info(price: AppPrice | None, eth_usd: EthUsd | None) -> dict[str, Any]:
    """go-livepeer takes prices in USD only (LR:normalizeLiveRunnerPriceInfo): a wei price
    is sent at the last ETH/USD reading; with none, or no price at all, 0 (an offchain
    orchestrator reads no price; an on-chain one refuses the heartbeat, said in status)."""
    if price is None:
        return {"price": 0, "currency": "usd", "unit": "hour"}
    unit = price.unit.value
    if price.currency is AppCurrency.USD:
        return {"price": str(price.amount), "currency": "usd", "unit": unit}
    if eth_usd is None:
        return {"price": 0, "currency": "usd", "unit": unit}
    usd = Fraction(price.amount) * eth_usd.rate / WEI_PER_ETH
    return {"price": str(Decimal(usd.numerator) / Decimal(usd.denominator)), "currency": "usd",
            "unit": unit}  # fmt: skip


def heartbeat_body(
    runner_id: str, spec: LiveRunnerSpec, url: str, price: dict[str, Any],
    gpu: dict[str, Any] | None, status: str = "ready",
) -> dict[str, Any]:  # fmt: skip
    """A heartbeat's full state (wire 2.3): the app as its LiveRunner declares it."""
    body: dict[str, Any] = {
        "runner_id": runner_id, "label": runner_id, "runner_url": url, "app": spec.app,
        "mode": spec.mode.value, "capacity": spec.capacity, "proxy": spec.proxy,
        "status": status, "price_info": price, "version": spec.version or "",
        "metadata": spec.metadata or "",
    }  # fmt: skip
    if gpu:
        body["gpu"] = gpu
    return body


def node_gpu(labels: Mapping[str, str] | None, node: str | None) -> dict[str, Any] | None:
    """A replica's GPU from its node's GPU feature discovery labels."""
    labels = labels or {}
    product = labels.get("nvidia.com/gpu.product")
    if not product:
        return None
    gpu: dict[str, Any] = {"id": node or "", "name": product}
    memory = labels.get("nvidia.com/gpu.memory", "")
    if memory.isdigit():
        gpu["vram_mb"] = int(memory)
    return gpu


@dataclass
class Held:
    """A replica registered with one orchestrator."""

    owner: Key  # its LiveRunner
    runner_id: str
    secret: str  # its heartbeat secret
    verify: bool  # whether the orchestrator's TLS certificate is verified
    interval: float
    due: float  # when its next heartbeat is due (monotonic)


@dataclass
class Summary:
    last_heartbeat: datetime | None = None
    last_error: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # runner id -> its last error


class Registrar:
    """Keeps every Ready replica registered with the orchestrators its LiveRunner names.

    `view` is the operator's (kopf indices); `secret(namespace, ref)` reads an orchestrator
    secret (None: unreadable, said in status); `node_labels(node)` a node's labels;
    `price(key)` the app's price and the ETH/USD reading; `write_status(key)` asks for the
    LiveRunner's status to be written again (registrations changed)."""

    def __init__(self, view: Any, secret: Callable[[str, Any], str | None],
                 node_labels: Callable[[str], Mapping[str, str] | None],
                 price: Callable[[Key], tuple[AppPrice | None, EthUsd | None]],
                 write_status: Callable[[Key], None], store: Any = None,
                 settle_seconds: float = SETTLE_SECONDS) -> None:  # fmt: skip
        self.view, self.secret, self.node_labels = view, secret, node_labels
        self.price, self.write_status = price, write_status
        self.store = store  # Redis (sync): held registrations outlive an operator restart
        self.settle_seconds = settle_seconds
        self.held: dict[tuple[str, str], Held] = {}  # (orchestrator url, runner id) -> held
        self._loaded: set[tuple[str, str]] = set()  # held from the store, not yet seen wanted
        self._specs: dict[Key, tuple[str, LiveRunnerSpec | None]] = {}  # by resourceVersion
        self._retry: dict[tuple[str, str], float] = {}  # unregistered after a failure: when
        self._started: float | None = None
        self.summaries: dict[tuple[Key, str], Summary] = {}  # (LiveRunner, url) -> summary
        self._sessions: dict[bool, aiohttp.ClientSession] = {}  # by TLS verification

    # -- what status shows ---------------------------------------------------------------
    def registrations(self, key: Key, spec: LiveRunnerSpec) -> list[Registration]:
        out = []
        for orchestrator in spec.register_with:
            summary = self.summaries.get((key, orchestrator.url), Summary())
            registered = sum(1 for (url, _), held in list(self.held.items())
                             if url == orchestrator.url and held.owner == key)  # fmt: skip
            out.append(Registration(orchestrator=orchestrator.url, registered=registered,
                                    last_heartbeat=summary.last_heartbeat,
                                    last_error=summary.last_error))  # fmt: skip
        return out

    # -- the loop ------------------------------------------------------------------------
    async def run_forever(self, every: float = 1.0) -> None:
        try:
            while True:
                try:
                    await self.tick(time.monotonic())
                except Exception:
                    log.exception("registering Live Runner replicas failed; trying again")
                await asyncio.sleep(every)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection pools (made again if the registrar goes on)."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    def wanted(self) -> dict[tuple[str, str], tuple[Key, ExternalOrchestrator, Replica, Any]]:
        """(orchestrator url, runner id) -> what to register, from the view now."""
        wanted = {}
        for key in list(self.view.live_runners):
            body = self.view.one(self.view.live_runners, key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                continue
            spec = self._spec(key, body)
            if spec is None or not spec.register_with:
                continue
            for replica in ready_replicas(self.view.many(self.view.live_pods, key)):
                runner_id = f"{key[0]}.{replica.pod}"
                for orchestrator in spec.register_with:
                    wanted[(orchestrator.url, runner_id)] = (key, orchestrator, replica, spec)
        return wanted

    def _spec(self, key: Key, body: Mapping[str, Any]) -> LiveRunnerSpec | None:
        """The LiveRunner's spec, validated once per version of it (this runs every second,
        on the event loop); None when it names no orchestrator or is invalid."""
        if not (body.get("spec") or {}).get("registerWith"):
            return None
        version = body["metadata"].get("resourceVersion", "")
        cached = self._specs.get(key)
        if cached is None or cached[0] != version:
            try:
                spec: LiveRunnerSpec | None = LiveRunnerSpec.model_validate(body["spec"])
            except ValueError:
                spec = None
            self._specs[key] = cached = (version, spec)
        return cached[1]

    async def tick(self, now: float) -> None:
        if self._started is None:
            self._started = now
            await asyncio.to_thread(self._load, now)
        wanted = self.wanted()
        self._loaded -= wanted.keys()
        self._retry = {pair: at for pair, at in self._retry.items() if pair in wanted}
        self._specs = {key: v for key, v in self._specs.items() if key in self.view.live_runners}
        settling = now - self._started < self.settle_seconds
        jobs = []
        for held_key in [k for k in self.held if k not in wanted]:
            if held_key in self._loaded and settling:
                continue  # read back after a restart: the view may not show it yet
            self._loaded.discard(held_key)
            jobs.append(self._unregister(held_key))
        for pair, (key, orchestrator, replica, spec) in wanted.items():
            held = self.held.get(pair)
            due = held.due if held else self._retry.get(pair, now)
            if due <= now:
                jobs.append(self._beat(pair, key, orchestrator, replica, spec, now))
        if jobs:
            await asyncio.gather(*jobs)

    # -- the store -----------------------------------------------------------------------
    def _load(self, now: float) -> None:
        """What was held before a restart: heartbeats go on with the same secrets, so the
        orchestrator keeps the runners and their sessions."""
        if self.store is None:
            return
        try:
            stored = self.store.hgetall(STORE_KEY)
        except Exception as exc:  # Redis away: registered afresh, as without a store
            log.warning("held registrations not read back: %s", exc)
            return
        for name, value in stored.items():
            url, runner_id = name.decode().rsplit(" ", 1)
            held = json.loads(value)
            pair = (url, runner_id)
            owner = (held["owner"][0], held["owner"][1])
            self.held[pair] = Held(owner, runner_id, held["secret"], held["verify"],
                                   held["interval"], now)  # fmt: skip
            self._loaded.add(pair)
        if stored:
            log.info("read back %d held registrations", len(stored))

    def _keep(self, pair: tuple[str, str], held: Held | None) -> None:
        """Write (or, None: remove) a held registration in the store, off the loop."""
        if self.store is None:
            return
        field = f"{pair[0]} {pair[1]}"
        try:
            if held is None:
                self.store.hdel(STORE_KEY, field)
            else:
                self.store.hset(STORE_KEY, field, json.dumps({
                    "owner": list(held.owner), "secret": held.secret, "verify": held.verify,
                    "interval": held.interval}))  # fmt: skip
        except Exception as exc:  # the next change writes it again; a restart re-registers
            log.warning("held registration of %s not stored: %s", pair[1], exc)

    # -- one replica ---------------------------------------------------------------------
    def _http(self, verify: bool) -> aiohttp.ClientSession:
        if verify not in self._sessions:
            self._sessions[verify] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=None if verify else False, limit=64),
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
            )
        return self._sessions[verify]

    async def _beat(self, pair: tuple[str, str], key: Key, orchestrator: ExternalOrchestrator,
                    replica: Replica, spec: LiveRunnerSpec, now: float) -> None:  # fmt: skip
        url, runner_id = pair
        held = self.held.get(pair)
        summary = self.summaries.setdefault((key, url), Summary())
        if held is None:
            secret = await asyncio.to_thread(self.secret, key[0], orchestrator.secret_ref)
            if secret is None:
                self._failed(key, summary, runner_id, f"Secret {orchestrator.secret_ref.name} "
                             f"key {orchestrator.secret_ref.key} cannot be read")  # fmt: skip
                self._retry[pair] = now + DEFAULT_INTERVAL
                return
        else:
            secret = held.secret
        app_price, eth_usd = self.price(key)
        labels = (await asyncio.to_thread(self.node_labels, replica.node)
                  if replica.node else None)  # fmt: skip
        body = heartbeat_body(
            runner_id, spec, runner_url(orchestrator.runner_url, key[0], replica, spec.port),
            price_info(app_price, eth_usd), node_gpu(labels, replica.node),
        )  # fmt: skip
        try:
            async with self._http(not orchestrator.insecure_skip_verify).post(
                f"{url.rstrip('/')}/runners/heartbeat", json=body,
                headers={"Authorization": secret},
            ) as answer:  # fmt: skip
                text = await answer.text()
                if answer.status != 200:
                    raise _Refused(answer.status, text.strip())
                reply = await answer.json(content_type=None)
        except _Refused as exc:
            if held is not None and exc.status in (401, 404):
                self.held.pop(pair, None)  # forgotten there (restart, expiry): register again
                await asyncio.to_thread(self._keep, pair, None)
            elif held is not None:  # anything else (a proxy's 502, a bad price): keep it
                held.due = now + held.interval
            self._retry[pair] = now + DEFAULT_INTERVAL  # not registered: tried again then
            self._failed(key, summary, runner_id, f"{exc.status} {exc.text}"[:512])
            return
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(key, summary, runner_id, f"{type(exc).__name__}: {exc}"[:512])
            if held is not None:
                held.due = now + held.interval
            self._retry[pair] = now + DEFAULT_INTERVAL
            return
        interval = _seconds(reply.get("heartbeat_interval"), DEFAULT_INTERVAL)
        first = held is None
        self._retry.pop(pair, None)
        if first:  # from now on, the secret it was given
            secret = reply.get("heartbeat_secret") or secret
        self.held[pair] = Held(key, runner_id, secret, not orchestrator.insecure_skip_verify,
                               interval, now + interval)  # fmt: skip
        if first:
            await asyncio.to_thread(self._keep, pair, self.held[pair])
        summary.last_heartbeat = datetime.now(UTC)
        had_error = summary.errors.pop(runner_id, None) is not None
        if not summary.errors and summary.last_error is not None:
            summary.last_error = None
            had_error = True
        if first or had_error:
            if first:
                log.info("registered %s with %s", runner_id, url)
            self.write_status(key)

    async def _unregister(self, pair: tuple[str, str]) -> None:
        url, runner_id = pair
        held = self.held.pop(pair)
        await asyncio.to_thread(self._keep, pair, None)
        with_secret = {"Authorization": held.secret}
        try:
            async with self._http(held.verify).post(
                f"{url.rstrip('/')}/runners/{runner_id}/unregister", headers=with_secret
            ) as answer:
                await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:  # it expires there by itself
            log.info("unregistering %s from %s failed: %s", runner_id, url, exc)
        log.info("unregistered %s from %s", runner_id, url)
        self.write_status(held.owner)

    def _failed(self, key: Key, summary: Summary, runner_id: str, error: str) -> None:
        changed = summary.last_error != error
        summary.last_error = summary.errors[runner_id] = error
        if changed:
            log.warning("registering %s: %s", runner_id, error)
            self.write_status(key)


def read_orchestrator_secret(kube: Any, settings: Any, namespace: str, ref: Any) -> str | None:
    """An orchestrator secret, trimmed as go-livepeer trims its file; None when the Secret
    is not one the operator may read (settings.orchestrator_secrets), or is not there."""
    if ref.name not in settings.orchestrator_secrets:
        log.warning("Secret %s/%s is not in the operator's orchestrator secrets (%s)",
                    namespace, ref.name, ", ".join(settings.orchestrator_secrets))  # fmt: skip
        return None
    try:
        found = kube.core.read_namespaced_secret(ref.name, namespace)
    except Exception as exc:  # 404, 403: said in status by the caller
        log.warning("Secret %s/%s not read: %s", namespace, ref.name,
                    getattr(exc, "reason", type(exc).__name__))  # fmt: skip
        return None
    value = (found.data or {}).get(ref.key)
    return base64.b64decode(value).decode().strip() if value else None


@functools.lru_cache(maxsize=1024)
def _node_labels_cached(kube: Any, node: str, minute: int) -> tuple[tuple[str, str], ...]:
    try:
        labels = kube.core.read_node(node).metadata.labels or {}
    except Exception:
        labels = {}
    return tuple(sorted(labels.items()))


def node_labels(kube: Any, node: str) -> Mapping[str, str]:
    """A node's labels, read at most once a minute."""
    return dict(_node_labels_cached(kube, node, int(time.time() // 60)))


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


def _seconds(value: Any, default: float) -> float:
    """A Go duration of one unit ("5s", "500ms"), as the SDK reads it; else `default`."""
    if not isinstance(value, str):
        return default
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        number = value.removesuffix(suffix)
        if number != value:
            try:
                return max(0.5, float(number) * scale)
            except ValueError:
                return default
    return default
