#!/usr/bin/env python3
"""Proxy overhead, as ratios against baselines measured in the same run.

1. Added latency on a trivial fast route at a fixed request rate: the same POST
   /text-to-image straight to a runner stand-in (an aiohttp server that answers at once,
   so only the hop's own cost shows), through nginx as a reverse proxy (one worker,
   upstream keep-alive: the baseline hop), and through `kubepeer proxy` (payments off, a
   bearer token) on each server it can run on; plaintext and TLS; and through a bare Python
   forwarder (uvloop + httptools, no checks: the least a Python hop adds on this machine),
   alone and with a job's least work inline ("+ checks": headers read, the bearer token
   checked, the JSON decoded and priced, the runner's JSON cut to the gateway's fields).
   Every hop is measured in --rounds short rounds (--round-seconds), interleaved (direct,
   nginx, proxies, then again), so that the machine's speed, which drifts over seconds,
   falls on all of them alike. Printed: p50 and p99 over all of a hop's requests, its CPU
   per request at that rate (its own process, median of the rounds), "added p50" (the
   median over rounds of the hop's p50 minus direct's in the same round, with the quartiles
   of those), "added p99" (the hop's p99 minus direct's) and "x nginx" (a hop's added p50
   over nginx's). The load generator's garbage collector is paused while it times a hop.
   1b: the TLS rows again over one HTTP/2 connection, as go-livepeer's client sends jobs
   (ForceAttemptHTTP2), against nginx's h2.
2. Throughput at a fixed concurrency, the same ways.
3. GetOrchestrator (payments on: signature check, prices, ticket params, auth token) with a
   fresh TLS connection per call, as go-livepeer dials, against a fresh-connection GET
   /healthz on the same port; and its server time, the handler timed in-process.
   3b: under load, 1 to 64 concurrent gateways, each its own key: calls/s and p50 per
   level, and the calls per second of the proxy's CPU (calls/s per core) at p50 <= 100 ms.
4. Hold overhead: jobs held for an OnDemand model with no ready replica; the time from the
   replica turning ready (the endpoint watch's callback) to each job reaching the runner.
5. A paid job's cost (payments on, plaintext, uvicorn; a gateway's Livepeer-Payment and
   Livepeer-Segment on every job, results as URLs in Redis), as section 1 measures it, in
   interleaved rounds against direct to the runner: with 1 served model and with 1,000;
   with Redis further away (a relay that holds each of its answers 1 ms; the round trip it
   adds is measured with PINGs); and, with --baseline REV, the same proxy at REV (a git
   worktree, in the same run).
   Printed as ratios: CPU per job and added p50 at 1,000 models over 1 model; CPU per job
   over REV's; and what Redis further away adds to a job, here and at REV.

Run: .venv/bin/python hack/bench/proxy.py [--rate 200] [--rounds 25] [--seconds 5] [--calls 100]
     [--sections 1,1b,2,3,3b,4,5] [--baseline REV]
"CPU us per request" (section 2) is the measure the machine's load disturbs least.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak
from redis import Redis

from kubepeer.livepeer import net_pb2
from kubepeer.payments.senders import SenderWatch
from kubepeer.payments.watcher import save_view
from kubepeer.proxy.main import build
from kubepeer.proxy.server import SERVERS, self_signed
from kubepeer.proxy.settings import ProxySettings
from kubepeer_dev.bench import (
    CHAIN,
    FUNDED,
    cpu_seconds,
    free_port,
    keep_view_fresh,
    percentile,
    wait_up,
    wait_up_port,
)
from kubepeer_dev.gateway_sim import Gateway

REPO = Path(__file__).resolve().parents[2]

MODEL = "kubepeer-bench/fast"
BODY = {"prompt": "x", "height": 8, "width": 8, "model_id": MODEL}
STAND_IN = """
import sys, time
from aiohttp import web
REPLY = {"images": [{"url": "data:image/png;base64,iVBORw0KGgo=", "seed": 1, "nsfw": False}]}
ARRIVALS = []
async def t2i(request):
    ARRIVALS.append(time.time())
    await request.read()
    return web.json_response(REPLY)
async def arrivals(request):
    return web.json_response(ARRIVALS)
app = web.Application()
app.router.add_post("/text-to-image", t2i)
app.router.add_get("/arrivals", arrivals)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
FORWARDER = """
# The least a Python hop can add: uvloop + httptools, callbacks only, no checks at all; each
# request goes to the runner on a pooled keep-alive connection and its answer comes back as
# the runner's bytes. Plain HTTP/1.1, Content-Length bodies: enough for this bench's route.
import asyncio, sys, httptools, uvloop
RUNNER = ("127.0.0.1", int(sys.argv[2]))
idle = []
class Upstream(asyncio.Protocol):
    def __init__(self, client, request):
        self.client, self.pending, self.answer = client, request, bytearray()
        self.parser = httptools.HttpResponseParser(self)
    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.pending)
    def data_received(self, data):
        self.answer += data
        self.parser.feed_data(data)
    def on_message_complete(self):
        self.client.transport.write(bytes(self.answer))
        self.answer.clear()
        idle.append(self)
class Client(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.body = transport, []
        self.parser = httptools.HttpRequestParser(self)
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_url(self, url):
        self.url = url
    def on_body(self, body):
        self.body.append(body)
    def on_message_complete(self):
        body, self.body = b"".join(self.body), []
        head = b"%s %s HTTP/1.1\\r\\nHost: runner\\r\\n" % (self.parser.get_method(), self.url)
        request = head + b"Content-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (
            len(body), body)
        if idle:
            upstream = idle.pop()
            upstream.client = self
            upstream.transport.write(request)
        else:
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(lambda: UPSTREAM(self, request), *RUNNER))
# With "checks" (a third argument): the least of a job's own work as well, inline: headers
# read, the bearer token checked, the JSON decoded and priced, a request id; the runner's
# JSON decoded, cut to the gateway's fields and encoded under a head of its own.
import hmac, secrets, orjson
class CheckedUpstream(Upstream):
    def on_message_complete(self):
        answer = orjson.loads(self.answer[self.answer.index(b"\\r\\n\\r\\n") + 4:])
        images = [{"url": i["url"], "seed": i["seed"], "nsfw": i["nsfw"]} for i in answer["images"]]
        reply = orjson.dumps({"images": images}, option=orjson.OPT_APPEND_NEWLINE)
        head = b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n"
        head += b"x-request-id: %s\\r\\ncontent-length: %d\\r\\n\\r\\n" % (
            self.client.request_id, len(reply))
        self.client.transport.write(head + reply)
        self.answer.clear()
        idle.append(self)
class CheckedClient(Client):
    def connection_made(self, transport):
        super().connection_made(transport)
        self.headers = {}
    def on_header(self, name, value):
        self.headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    def on_message_complete(self):
        headers, self.headers = self.headers, {}
        self.request_id = (headers.get("x-request-id") or secrets.token_hex(8)).encode()
        token = headers.get("authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(token, b"bench"):  # (wait_up's GET: up, and refused)
            self.body = []
            self.transport.write(b"HTTP/1.1 401 Unauthorized\\r\\ncontent-length: 0\\r\\n\\r\\n")
            return
        fields = orjson.loads(b"".join(self.body))
        assert int(fields.get("height") or 512) * int(fields.get("width") or 512) > 0
        super().on_message_complete()
CHECKS = len(sys.argv) > 3
UPSTREAM, CLIENT = (CheckedUpstream, CheckedClient) if CHECKS else (Upstream, Client)
async def main():
    server = await asyncio.get_running_loop().create_server(CLIENT, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""
DELAY_RELAY = """
# Redis further away: a relay that holds each piece of Redis's answers 1 ms (asyncio's own
# loop: its timers are not rounded down to whole milliseconds, as libuv's are).
import asyncio, sys
HOLD = 0.001
class Half(asyncio.Protocol):
    def __init__(self, peer=None, hold=0.0):
        self.peer, self.hold, self.held, self.transport = peer, hold, [], None
    def connection_made(self, transport):
        self.transport = transport
        if self.peer is not None:
            self.peer.peer = self
            for data in self.peer.held:
                transport.write(data)
    def data_received(self, data):
        if self.hold:
            asyncio.get_running_loop().call_later(self.hold, self.forward, data)
        else:
            self.forward(data)
    def forward(self, data):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.held.append(data)
    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
class Client(Half):
    def connection_made(self, transport):
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        redis = lambda: Half(self, HOLD)
        loop.create_task(loop.create_connection(redis, "127.0.0.1", int(sys.argv[2])))
async def main():
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""
NGINX = """
worker_processes 1;
daemon off;
{user}
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  fastcgi_temp_path {work}/nginx-fastcgi;
  uwsgi_temp_path {work}/nginx-uwsgi;
  scgi_temp_path {work}/nginx-scgi;
  keepalive_requests 100000;
  upstream runner {{ server 127.0.0.1:{runner}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{plain};
    listen 127.0.0.1:{tls} ssl http2;
    ssl_certificate {work}/cert.pem;
    ssl_certificate_key {work}/key.pem;
    location / {{
      proxy_pass http://runner;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def ping_time(url: str, pings: int = 200) -> float:
    client = Redis.from_url(url)
    times = []
    for _ in range(pings):
        start = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - start)
    client.close()
    return statistics.median(times)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """This process's garbage collector off while it times a hop. A full collection of the
    load generator stalls every request in flight for tens of ms, and then sends the late
    ones in a burst: a p99 charged to whichever hop was being measured."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def paced(one: Callable[[], Awaitable[float]], rate: float, seconds: float) -> list[float]:
    """Open loop: `one` started every 1/rate s (after 50 to warm connections); its times."""
    for _ in range(50):
        await one()
    tasks = []
    with gc_paused():
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        return list(await asyncio.gather(*tasks))


async def at_rate(
    url: str, rate: float, seconds: float, headers: dict[str, str], failures: list[object]
) -> list[float]:
    """HTTP/1.1 keep-alive: latencies in seconds; non-200s in `failures`."""
    connector = aiohttp.TCPConnector(limit=0, ssl=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> float:
            start = time.perf_counter()
            try:
                async with session.post(url, json=BODY, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        failures.append(response.status)
            except aiohttp.ClientError as exc:  # counted, not fatal: a saturated hop
                failures.append(type(exc).__name__)
            return time.perf_counter() - start

        return await paced(one, rate, seconds)


async def at_rate_h2(
    url: str, rate: float, seconds: float, headers: dict[str, str], failures: list[object]
) -> list[float]:
    """As at_rate, over one HTTP/2 TLS connection, as go-livepeer's client sends jobs."""
    async with httpx.AsyncClient(http2=True, verify=False, timeout=60) as client:

        async def one() -> float:
            start = time.perf_counter()
            try:
                response = await client.post(url, json=BODY, headers=headers)
                if response.status_code != 200 or response.http_version != "HTTP/2":
                    failures.append((response.status_code, response.http_version))
            except httpx.HTTPError as exc:
                failures.append(type(exc).__name__)
            return time.perf_counter() - start

        return await paced(one, rate, seconds)


async def closed_loop(url: str, concurrency: int, seconds: float, headers: dict[str, str]) -> float:
    connector = aiohttp.TCPConnector(limit=0, ssl=False)
    done = 0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(deadline: float) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(url, json=BODY, headers=headers) as response:
                        await response.read()
                        done += response.status == 200

        with gc_paused():
            deadline = time.perf_counter() + seconds
            await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
    return done / seconds


def discovery_request() -> net_pb2.OrchestratorRequest:
    account = Account.create()
    sig = Account.sign_message(
        encode_defunct(primitive=keccak(account.address.encode())), account.key
    ).signature
    request = net_pb2.OrchestratorRequest(address=bytes.fromhex(account.address[2:]), sig=sig)
    request.capabilities.constraints.per_capability[27].models[MODEL].warm = False
    return request


def fresh_tls_calls(port: int, calls: int) -> tuple[list[float], list[float]]:
    pem = ssl.get_server_certificate(("127.0.0.1", port)).encode()
    request = discovery_request()
    grpc_times, https_times = [], []
    for _ in range(calls):
        start = time.perf_counter()
        with grpc.secure_channel(
            f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=pem)
        ) as channel:
            info = channel.unary_unary(
                "/net.Orchestrator/GetOrchestrator",
                request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
                response_deserializer=net_pb2.OrchestratorInfo.FromString,
            )(request, timeout=10)
        grpc_times.append(time.perf_counter() - start)
        assert info.ticket_params.recipient, "discovery without ticket params"
        start = time.perf_counter()
        with httpx.Client(verify=False, http2=True) as client:
            client.get(f"https://127.0.0.1:{port}/healthz")
        https_times.append(time.perf_counter() - start)
    return grpc_times, https_times


def discovery_load(port: int, pid: int, seconds: float) -> list[tuple[int, float, float, float]]:
    """GetOrchestrator from `callers` concurrent gateways (a fresh TLS connection per call,
    each gateway its own key), for `seconds` at each level, 1 to 64 callers, stopping after
    the first level whose p50 passes 100 ms. Per level: (callers, calls/s, p50 s, calls per
    second of the proxy's CPU)."""
    pem = ssl.get_server_certificate(("127.0.0.1", port)).encode()

    def caller(request: net_pb2.OrchestratorRequest, until: float) -> list[float]:
        times = []
        while time.monotonic() < until:
            start = time.perf_counter()
            with grpc.secure_channel(
                f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=pem)
            ) as channel:
                channel.unary_unary(
                    "/net.Orchestrator/GetOrchestrator",
                    request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
                    response_deserializer=net_pb2.OrchestratorInfo.FromString,
                )(request, timeout=30)
            times.append(time.perf_counter() - start)
        return times

    levels = []
    for callers in (1, 2, 4, 8, 16, 32, 64):
        requests = [discovery_request() for _ in range(callers)]
        for request in requests:  # each gateway's first call waits for its sender's facts
            caller(request, 0)
        cpu, start = cpu_seconds(pid), time.monotonic()
        with ThreadPoolExecutor(callers) as pool:
            runs = list(pool.map(caller, requests, [start + seconds] * callers))
        wall, used = time.monotonic() - start, cpu_seconds(pid) - cpu
        times = [t for run in runs for t in run]
        levels.append((callers, len(times) / wall, percentile(times, 0.5),
                       len(times) / max(used, 1e-9)))  # fmt: skip
        if percentile(times, 0.5) > 0.1:
            break
    return levels


async def asgi_job(proxy: object, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """One job straight into the proxy's ASGI app (no server): the status it answers."""
    scope = {"type": "http", "method": "POST", "path": "/text-to-image", "query_string": b"",
             "raw_path": b"/text-to-image", "headers": headers, "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "root_path": "", "asgi": {"version": "3.0"}}  # fmt: skip
    chunks = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if chunks:
            return chunks.pop()
        await asyncio.Event().wait()  # never disconnects
        return {}

    async def send(message: dict) -> None:
        sent.append(message)

    await proxy(scope, receive, send)
    return sent[0]["status"]


@contextlib.asynccontextmanager
async def running(proxy: Any, keep_current: Any) -> AsyncIterator[None]:
    """The proxy's lifespan (its runner client) and its input keeper, in this loop."""
    inbox: asyncio.Queue[dict] = asyncio.Queue()
    outbox: asyncio.Queue[dict] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    life = asyncio.create_task(
        proxy.http_app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    await outbox.get()
    keeper = asyncio.create_task(keep_current())
    await asyncio.sleep(0.1)
    try:
        yield
    finally:
        keeper.cancel()
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        life.cancel()


async def hold_overhead(work: Path, redis_url: str, runner: str, jobs: int) -> list[float]:
    """Seconds from the replica turning ready to each held job reaching the runner."""
    models = {"version": 1, "models": [{
        "aimodel": "cold", "pipeline": "text-to-image", "modelId": MODEL, "runner": "runner-cold",
        "port": 0, "capacity": 1000, "warm": "OnDemand", "maxReplicas": 1,
        "price": {"weiPerUnit": "1", "gateways": {}, "surge": None},
    }]}  # fmt: skip
    (work / "cold-models.json").write_text(json.dumps(models))
    (work / "cold-endpoints.json").write_text("{}")
    args = ProxySettings(
        bind="127.0.0.1:0", public_url="http://127.0.0.1:0", namespace="bench-hold",
        redis_url=redis_url, models_file=work / "cold-models.json",
        endpoints_file=work / "cold-endpoints.json", payments=False,
        bearer_token_file=work / "bearer", wake=False,
    )  # fmt: skip
    proxy, keep_current = build(args)
    async with aiohttp.ClientSession() as http:
        before = len(await (await http.get(f"{runner}/arrivals")).json())
    body = json.dumps(BODY).encode()
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer bench")]
    async with running(proxy, keep_current):
        held = [asyncio.create_task(asgi_job(proxy, body, headers)) for _ in range(jobs)]
        model = proxy.catalogue().models[0]
        while proxy.router.queued(model) < jobs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # settled: every job is waiting
        ready_at = time.time()
        # What the EndpointSlice watch's callback does when a replica turns ready.
        proxy.router.set_endpoints({"runner-cold": (runner,)}, proxy.catalogue().models)
        proxy.endpoints_changed()
        statuses = await asyncio.gather(*held)
    assert statuses == [200] * jobs, statuses
    async with aiohttp.ClientSession() as http:
        arrivals = (await (await http.get(f"{runner}/arrivals")).json())[before:]
    return [at - ready_at for at in arrivals]


async def discovery_server_time(work: Path, redis_url: str, calls: int) -> list[float]:
    """GetOrchestrator's handler, timed in-process with payments on (no TLS, no framing)."""
    args = ProxySettings(
        bind="127.0.0.1:0", public_url="https://127.0.0.1:0", namespace="bench",
        redis_url=redis_url, models_file=work / "models.json",
        endpoints_file=work / "endpoints.json", recipient="0x" + "5a" * 20,
        recipient_secret_file=work / "recipient-secret", auth_secret_file=work / "auth-secret",
        wake=False,
    )  # fmt: skip
    proxy, keep_current = build(args)
    raw = discovery_request().SerializeToString()
    times = []
    async with running(proxy, keep_current):
        await asyncio.sleep(1.2)  # the endpoint file is read
        for _ in range(calls):
            start = time.perf_counter()
            await proxy.get_orchestrator(raw)
            times.append(time.perf_counter() - start)
    return times


def latency_section(
    targets: dict[str, tuple[str, dict[str, str]]],
    pids: dict[str, int],
    args: Any,
    title: str = "1. latency",
) -> dict[str, tuple[float, float]]:
    """Section 1: each hop at a fixed rate, in many short interleaved rounds. The machine's
    speed drifts over seconds, so a hop is compared with direct round by round: "added p50"
    is the median over rounds of (the hop's p50 - direct's p50) in each round. p50 and p99
    are over all of a hop's requests; "added p99" is the hop's p99 - direct's. Returns each
    hop's (CPU us per request, added p50 ms)."""
    print(f"\n{title} at {args.rate:.0f} requests/s, HTTP/1.1 keep-alive, {args.rounds} "
          f"interleaved rounds of {args.round_seconds:g} s (ms; CPU us per request of the "
          "hop's own process)")  # fmt: skip
    p50s: dict[str, list[float]] = {name: [] for name in targets}
    cpus: dict[str, list[float]] = {name: [] for name in targets}
    everything: dict[str, list[float]] = {name: [] for name in targets}
    failed: dict[str, int] = dict.fromkeys(targets, 0)
    for _ in range(args.rounds):
        for name, (url, headers) in targets.items():
            failures: list[object] = []
            cpu = cpu_seconds(pids[name])
            samples = asyncio.run(at_rate(url, args.rate, args.round_seconds, headers, failures))
            cpus[name].append((cpu_seconds(pids[name]) - cpu) / (len(samples) + 50) * 1e6)
            p50s[name].append(percentile(samples, 0.5) * 1e3)
            everything[name] += samples
            failed[name] += len(failures)
    direct = "direct to the runner"
    direct_p99 = percentile(everything[direct], 0.99) * 1e3
    added_nginx: dict[str, float] = {}
    measured: dict[str, tuple[float, float]] = {}
    for name in targets:
        p50, p99 = (percentile(everything[name], q) * 1e3 for q in (0.5, 0.99))
        label = name + (f" [{failed[name]} failed]" if failed[name] else "")
        cpu = statistics.median(cpus[name])
        line = f"   {label:30s} p50 {p50:6.2f}  p99 {p99:6.2f}  CPU {cpu:5.0f}"
        if name == direct:
            print(line)
            continue
        by_round = sorted(r - d for r, d in zip(p50s[name], p50s[direct], strict=True))
        added = statistics.median(by_round)
        mode = name.rsplit("(", 1)[1].rstrip(")")
        versus = ""
        if name.startswith("nginx"):
            added_nginx[mode] = added
        elif added_nginx.get(mode, 0) > 0:
            versus = f"  x nginx {added / added_nginx[mode]:.1f}"
        quartiles = statistics.quantiles(by_round, n=4) if len(by_round) > 1 else [added] * 3
        print(f"{line}   added p50 {added:+.2f} (rounds' quartiles {quartiles[0]:+.2f}, "
              f"{quartiles[2]:+.2f}) p99 {p99 - direct_p99:+.2f}{versus}")  # fmt: skip
        measured[name] = (cpu, added)
    return measured


class Plain:
    """An orchestrator's gRPC in plaintext (h2c), for gateway_sim's `discover`."""

    def __init__(self, port: int) -> None:
        self.port = port

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}")


def many_models(runner_port: int, count: int) -> dict[str, Any]:
    """The bench's model and `count` - 1 others, every one served by the same runner."""
    models = [{
        "aimodel": f"m{i}", "pipeline": "text-to-image",
        "modelId": MODEL if i == 0 else f"kubepeer-bench/m{i}", "runner": "runner-fast",
        "port": runner_port, "capacity": 1000, "warm": "Always", "maxReplicas": 1,
        "price": {"weiPerUnit": "1", "gateways": {}, "surge": None},
    } for i in range(count)]  # fmt: skip
    return {"version": 1, "models": models}


def paid_section(work: Path, spawn: Callable[..., int], redis_url: str, runner_port: int,
                 runner_pid: int, args: Any) -> None:  # fmt: skip
    """Section 5: a paid job's cost (see the module's docstring)."""
    runner = f"http://127.0.0.1:{runner_port}"
    relay_port = free_port()
    spawn(sys.executable, "-c", DELAY_RELAY, str(relay_port), redis_url.split(":")[2].split("/")[0])
    far_redis = f"redis://127.0.0.1:{relay_port}/0"
    wait_up_port(relay_port)
    rtt = {url: ping_time(url) for url in (redis_url, far_redis)}
    print(f"\n   a Redis round trip (PING, p50): {rtt[redis_url] * 1e3:.2f} ms, through the relay "
          f"{rtt[far_redis] * 1e3:.2f} ms")  # fmt: skip
    (work / "models-1000.json").write_text(json.dumps(many_models(runner_port, 1000)))
    builds: list[tuple[str, Path]] = [("this tree", REPO / "operator")]
    if args.baseline:
        base = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)  # fmt: skip
        builds.append((f"at {args.baseline}", base / "operator"))
    variants = [("1 model", "models.json", redis_url), ("1,000 models", "models-1000.json",
                redis_url), ("Redis further", "models.json", far_redis)]  # fmt: skip
    targets: dict[str, tuple[str, dict[str, str]]] = {
        "direct to the runner": (f"{runner}/text-to-image", {})
    }
    pids = {"direct to the runner": runner_pid}
    try:
        for build_name, operator in builds:
            for variant, models, redis in variants:
                if build_name != "this tree" and variant == "1,000 models":
                    continue
                port = free_port()
                name = f"paid, {variant}, {build_name} (plain)"
                pids[name] = spawn(
                    sys.executable, "-m", "kubepeer.cli", "proxy", "--plaintext",
                    "--bind", f"127.0.0.1:{port}", "--public-url", f"http://127.0.0.1:{port}",
                    "--namespace", "bench", "--redis-url", redis, "--server", SERVERS[0],
                    "--models-file", str(work / models),
                    "--endpoints-file", str(work / "endpoints.json"), "--no-wake",
                    "--recipient", "0x" + "5a" * 20,
                    "--recipient-secret-file", str(work / "recipient-secret"),
                    "--auth-secret-file", str(work / "auth-secret"),
                    pythonpath=operator,
                )  # fmt: skip
                wait_up(f"http://127.0.0.1:{port}/healthz")
                targets[name] = (f"http://127.0.0.1:{port}/text-to-image", {})
        time.sleep(1.5)  # the endpoint files are read within a second of start
        for name, (url, _) in list(targets.items())[1:]:
            port = int(url.split(":")[2].split("/")[0])
            gateway = Gateway()
            info = gateway.discover(Plain(port), 27, MODEL)
            with httpx.Client(timeout=30) as client:  # credit enough for every job to come
                funded = client.post(url, json=BODY, headers=gateway.headers(info, 27, MODEL, 4))
                assert funded.status_code == 200, (name, funded.text)
            # Then, as a gateway whose credit covers its fees: a payment with no tickets.
            targets[name] = (url, gateway.headers(info, 27, MODEL, tickets=0))
        measured = latency_section(targets, pids, args, "5. a paid job")
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(work / "baseline")], check=False)  # fmt: skip
    (cpu, added), (cpu_many, added_many), (_, added_far) = (
        measured[f"paid, {variant}, this tree (plain)"] for variant, _, _ in variants)  # fmt: skip
    print(f"   1,000 served models over 1: CPU per job {cpu_many / cpu:.2f}x, "
          f"added p50 {added_many / added:.2f}x")  # fmt: skip
    far = (f"   Redis {(rtt[far_redis] - rtt[redis_url]) * 1e3:.2f} ms further adds to a job's "
           f"p50: {added_far - added:+.2f} ms (this tree)")  # fmt: skip
    if not args.baseline:
        print(far)
        return
    (base_cpu, base_added), (_, base_far) = (
        measured[f"paid, {variant}, at {args.baseline} (plain)"]
        for variant in ("1 model", "Redis further")
    )
    print(f"{far}, {base_far - base_added:+.2f} ms (at {args.baseline})")
    print(f"   CPU per job over {args.baseline}'s: {cpu / base_cpu:.2f}x (added p50 "
          f"{added:+.2f} ms against {base_added:+.2f} ms)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--calls", type=int, default=100, help="GetOrchestrator calls")
    parser.add_argument("--held", type=int, default=20, help="jobs held for a cold model")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds of section 1")
    parser.add_argument("--round-seconds", type=float, default=1.0, help="each round's length")
    parser.add_argument("--sections", default="1,1b,2,3,3b,4,5", help="which sections to run")
    parser.add_argument("--baseline", help="section 5: also the proxy at this git revision")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    servers = list(reversed(SERVERS))  # hypercorn, then uvicorn (the default)

    work = Path(tempfile.mkdtemp(prefix="kubepeer-bench-proxy-"))
    processes: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)

    def spawn(*command: str, pythonpath: Path | None = None) -> int:
        """`pythonpath`: another tree's source (a baseline commit), before the installed one."""
        log = (work / f"{len(processes)}.log").open("wb")
        own = env if pythonpath is None else {**env, "PYTHONPATH": str(pythonpath)}
        processes.append(subprocess.Popen(command, env=own, stdout=log, stderr=subprocess.STDOUT))
        return processes[-1].pid

    try:
        redis_port, runner_port = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        spawn("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "")
        wait_up_port(redis_port)
        spawn(sys.executable, "-c", STAND_IN, str(runner_port))
        runner = f"http://127.0.0.1:{runner_port}"
        models = {"version": 1, "models": [{
            "aimodel": "fast", "pipeline": "text-to-image", "modelId": MODEL,
            "runner": "runner-fast", "port": runner_port, "capacity": 1000, "warm": "Always",
            "maxReplicas": 1, "price": {"weiPerUnit": "1", "gateways": {}, "surge": None},
        }]}  # fmt: skip
        (work / "models.json").write_text(json.dumps(models))
        (work / "endpoints.json").write_text(json.dumps({"runner-fast": [runner]}))
        (work / "bearer").write_text("bench")
        (work / "recipient-secret").write_bytes(os.urandom(32))
        (work / "auth-secret").write_bytes(os.urandom(32))
        cert, key = self_signed("127.0.0.1")
        (work / "cert.pem").write_bytes(cert)
        (work / "key.pem").write_bytes(key)
        nginx_ports = {"plain": free_port(), "tls": free_port()}
        (work / "nginx.conf").write_text(NGINX.format(
            work=work, runner=runner_port, plain=nginx_ports["plain"], tls=nginx_ports["tls"],
            user="user root;" if os.geteuid() == 0 else ""))  # fmt: skip
        spawn("nginx", "-c", str(work / "nginx.conf"), "-p", str(work))
        server_pids = {"direct to the runner": processes[1].pid}
        for mode in ("plain", "tls"):
            server_pids[f"nginx ({mode})"] = processes[-1].pid
        forwarder_port = free_port()
        server_pids["python forwarder (plain)"] = spawn(
            sys.executable, "-c", FORWARDER, str(forwarder_port), str(runner_port)
        )
        checked_port = free_port()
        server_pids["forwarder + checks (plain)"] = spawn(
            sys.executable, "-c", FORWARDER, str(checked_port), str(runner_port), "checks"
        )
        ports: dict[tuple[str, str], int] = {}
        for server in servers:
            for mode in ("plain", "tls"):
                port = ports[(server, mode)] = free_port()
                server_pids[f"proxy, {server} ({mode})"] = spawn(
                    sys.executable, "-m", "kubepeer.cli", "proxy", "--bind", f"127.0.0.1:{port}",
                    "--public-url", f"{'https' if mode == 'tls' else 'http'}://127.0.0.1:{port}",
                    "--namespace", "bench", "--redis-url", redis_url, "--server", server,
                    "--models-file", str(work / "models.json"),
                    "--endpoints-file", str(work / "endpoints.json"), "--no-wake",
                    "--no-payments", "--bearer-token-file", str(work / "bearer"),
                    *(["--plaintext"] if mode == "plain" else []),
                )  # fmt: skip
        paid_port = free_port()  # discovery with payments on, as gateways see it
        paid_pid = spawn(
            sys.executable, "-m", "kubepeer.cli", "proxy", "--bind", f"127.0.0.1:{paid_port}",
            "--public-url", f"https://127.0.0.1:{paid_port}", "--namespace", "bench",
            "--redis-url", redis_url, "--server", SERVERS[0],
            "--models-file", str(work / "models.json"),
            "--endpoints-file", str(work / "endpoints.json"), "--no-wake",
            "--recipient", "0x" + "5a" * 20,
            "--recipient-secret-file", str(work / "recipient-secret"),
            "--auth-secret-file", str(work / "auth-secret"),
        )  # fmt: skip
        wait_up(f"{runner}/arrivals")
        wait_up(f"http://127.0.0.1:{nginx_ports['plain']}/arrivals")
        wait_up(f"http://127.0.0.1:{forwarder_port}/arrivals")
        wait_up(f"http://127.0.0.1:{checked_port}/arrivals")
        for (_, mode), port in [*ports.items(), (("paid", "tls"), paid_port)]:
            wait_up(f"{'https' if mode == 'tls' else 'http'}://127.0.0.1:{port}/healthz")
        keep_view_fresh(redis_url)
        # The payments process's sender watch, answering every gateway as well funded.
        SenderWatch(Redis.from_url(redis_url), lambda _: FUNDED).start()
        time.sleep(1.5)  # the endpoint file is read within a second of start
        auth = {"Authorization": "Bearer bench"}
        targets: dict[str, tuple[str, dict[str, str]]] = {
            "direct to the runner": (f"{runner}/text-to-image", {})
        }
        for mode, scheme in (("plain", "http"), ("tls", "https")):
            targets[f"nginx ({mode})"] = (
                f"{scheme}://127.0.0.1:{nginx_ports[mode]}/text-to-image",
                {},
            )
            if mode == "plain":
                targets["python forwarder (plain)"] = (
                    f"http://127.0.0.1:{forwarder_port}/text-to-image", {})  # fmt: skip
                targets["forwarder + checks (plain)"] = (
                    f"http://127.0.0.1:{checked_port}/text-to-image", auth)  # fmt: skip
            for server in servers:
                port = ports[(server, mode)]
                targets[f"proxy, {server} ({mode})"] = (
                    f"{scheme}://127.0.0.1:{port}/text-to-image", auth)  # fmt: skip

        print(f"\nload average at start: {os.getloadavg()[0]:.1f}")
        if "1" in sections:
            latency_section(targets, server_pids, args)

        if "1b" in sections:
            print(f"\n1b. latency at {args.rate:.0f} requests/s, HTTP/2 over TLS, one connection "
                  f"(ms; the client is httpx, so compare rows, not with 1)")  # fmt: skip
            nginx_h2 = None
            for name, (url, headers) in targets.items():
                if "(tls)" not in name:
                    continue
                failures: list[object] = []
                samples = asyncio.run(at_rate_h2(url, args.rate, args.seconds, headers, failures))
                p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
                label = name + (f" [{len(failures)} of {len(samples)} failed]" if failures else "")
                nginx_h2 = nginx_h2 or (p50, p99)
                print(f"   {label:30s} p50 {p50:6.2f}  p99 {p99:6.2f}   beyond nginx: p50 "
                      f"{p50 - nginx_h2[0]:+.2f} p99 {p99 - nginx_h2[1]:+.2f}")  # fmt: skip

        if "2" in sections:
            print(f"\n2. throughput, {args.concurrency} concurrent, {args.seconds:.0f} s "
                  "(requests/s), and the CPU each hop spent per request (us; the runner's own"
                  " for direct), which the machine's load does not inflate as it does"
                  " latency")  # fmt: skip
            direct = None
            for name, (url, headers) in targets.items():
                pid = server_pids[name]
                cpu = cpu_seconds(pid)
                rate = asyncio.run(closed_loop(url, args.concurrency, args.seconds, headers))
                per_job = (cpu_seconds(pid) - cpu) / max(1, rate * args.seconds) * 1e6
                direct = direct or rate
                print(f"   {name:30s} {rate:8.0f}   ({rate / direct:.2f} of direct)   "
                      f"CPU {per_job:5.0f} us per request")  # fmt: skip

        if "3" in sections:
            print(f"\n3. GetOrchestrator with payments on ({SERVERS[0]}), {args.calls} calls (ms)")
            save_view(Redis.from_url(redis_url), CHAIN)
            grpc_times, https_times = fresh_tls_calls(paid_port, args.calls)
            server_times = asyncio.run(discovery_server_time(work, redis_url, args.calls))
            for name, samples in [("GET /healthz, fresh TLS (h2)", https_times),
                                  ("GetOrchestrator, fresh TLS", grpc_times),
                                  ("GetOrchestrator server time", server_times)]:  # fmt: skip
                print(f"   {name:32s} p50 {percentile(samples, 0.5) * 1e3:6.2f}  "
                      f"p99 {percentile(samples, 0.99) * 1e3:6.2f}")  # fmt: skip
            extra = statistics.median(grpc_times) - statistics.median(https_times)
            print(f"   GetOrchestrator beyond a fresh-connection GET: p50 {extra * 1e3:+.2f} ms")

        if "3b" in sections:
            print(
                f"\n3b. GetOrchestrator under load (payments on, fresh TLS per call, "
                f"{args.seconds:g} s per level; the callers share this machine's cores)"
            )
            save_view(Redis.from_url(redis_url), CHAIN)
            best = None
            for callers, rate, p50, per_cpu in discovery_load(paid_port, paid_pid,
                                                              args.seconds):  # fmt: skip
                print(f"   {callers:3d} callers   {rate:7.0f} calls/s   p50 {p50 * 1e3:7.1f} ms   "
                      f"{per_cpu:6.0f} calls per proxy CPU-second")  # fmt: skip
                if p50 <= 0.1:
                    best = (rate, per_cpu)
            if best:
                print(f"   at p50 <= 100 ms: {best[0]:.0f} calls/s, {best[1]:.0f} calls/s per "
                      "core of the proxy (one process, one core)")  # fmt: skip

        if "4" in sections:
            print(f"\n4. hold overhead: {args.held} jobs held, replica turns ready (ms)")
            overheads = asyncio.run(hold_overhead(work, redis_url, runner, args.held))
            print(
                f"   first job sent after {min(overheads) * 1e3:.1f}, p50 "
                f"{statistics.median(overheads) * 1e3:.1f}, last {max(overheads) * 1e3:.1f}"
            )
        if "5" in sections:
            paid_section(work, spawn, redis_url, runner_port, processes[1].pid, args)
        print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
