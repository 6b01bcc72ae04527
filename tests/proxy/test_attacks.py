"""The proxy under attack, on real servers: a real proxy process, a real runner, real Redis
(and the dev chain where the sender's funds matter). Each test is an attack that once
worked; keep them green.

- free jobs: a price quoted for nothing (or for another model) paying for a priced job;
- senders with no money on the TicketBroker: tests/chain/test_sender_funds.py (it needs the
  dev chain and the payments process);
- a decompression bomb in the billing size check;
- Redis stopped: discovery UNAVAILABLE, jobs 503, readiness down, health up;
- revenue and ticket counts on the gateway-facing port; refusals counted by every reason;
- stalled large bodies without payment, and chunked bodies past the limit, held in memory.
"""

from __future__ import annotations

import io
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from kubepeer.payments.ledger import balance_key
from kubepeer_dev.gateway_sim import Gateway
from tests.conftest import RedisServer, _pings, free_port
from tests.proxies import (
    SD,
    T2I,
    FreshChainView,
    ProxyServer,
    models_json,
    start_proxy,
    stop_proxy,
)
from tests.support import wait_for

pytestmark = pytest.mark.redis
pytest_plugins = ["tests.proxies"]  # its chain_facts fixture

BLIP = "kubepeer-tiny/blip"


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, redis_server, sd_runner, chain_facts) -> Iterator[ProxyServer]:
    server = start_proxy(
        tmp_path_factory.mktemp("proxy"), redis_server, models=models_json(),
        endpoints={"runner-fleet": [sd_runner.url]}, args=["--metrics-port", str(METRICS_PORT)],
    )  # fmt: skip
    yield server
    stop_proxy(server)


def post_t2i(proxy: ProxyServer, headers: dict[str, str]):
    with proxy.http() as client:
        return client.post("/text-to-image", json=T2I, headers=headers)


# -- 1. free jobs -------------------------------------------------------------------------------
@pytest.mark.parametrize("asked", [None, (27, "nobody/serves-this")], ids=["no-caps", "unserved"])
@pytest.mark.parametrize("tickets", [0, 1])
def test_a_price_quoted_for_something_else_never_pays_for_a_job(
    proxy, redis_server, asked, tickets
):
    """A discovery for no model (or one we do not serve) quotes 0/1 with params issued at
    0/1. Neither a ticketless payment at 0/1 nor tickets on those params may then pay for a
    priced text-to-image job: the price that counts is the job's own model's."""
    gateway = Gateway()
    info = gateway.discover(proxy, *(asked or (None, None)))
    assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (0, 1)
    # The job's credentials need an auth token; the payment claims the price quoted above.
    response = post_t2i(proxy, gateway.headers(info, 27, SD, tickets=tickets, price=(0, 1)))
    assert response.status_code == 400, response.text
    assert response.text == (
        "expected price 0 wei/unit was not offered to this sender for this job\n"
    )
    # Nothing credited, nothing served for free.
    assert redis_server.client().get(balance_key(gateway.address, f"27_{SD}")) is None


def test_the_jobs_own_price_still_pays(proxy):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    assert info.price_info.price_per_unit > 0
    response = post_t2i(proxy, gateway.headers(info, 27, SD, tickets=50))
    assert response.status_code == 200, response.text


# -- 7. decompression bombs -----------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (the IHDR rewritten, CRC fixed)."""
    import struct
    import zlib

    raw = io.BytesIO()
    Image.new("RGB", (1, 1)).save(raw, "PNG")
    data = bytearray(raw.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("route", ["image-to-text", "image-to-image", "upscale",
                                   "segment-anything-2"])  # fmt: skip
def test_an_image_claiming_ten_billion_pixels_is_a_400_not_a_500(proxy, route):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    headers = gateway.headers(info, 27, SD, tickets=0)
    files = {"image": ("bomb.png", png_claiming(100_000, 100_000), "image/png")}
    with proxy.http() as client:
        response = client.post(f"/{route}", files=files, data={"model_id": BLIP},
                               headers=headers)  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.text.startswith("Unable to decode image"), response.text


# -- 5 and 6. Redis hanging or down ----------------------------------------------------------
@pytest.fixture
def lone_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and resume."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, process=process)
    wait_for(lambda: _pings(server), timeout=20, what="redis-server to answer PING")
    yield server
    process.send_signal(signal.SIGCONT)
    process.terminate()
    process.wait(timeout=10)


def grpc_status(proxy: ProxyServer, gateway: Gateway) -> tuple[grpc.StatusCode, str]:
    try:
        gateway.discover(proxy, 27, SD)
    except grpc.RpcError as refused:
        return refused.code(), refused.details()
    return grpc.StatusCode.OK, ""


def test_a_stopped_redis_gives_unavailable_and_503s_and_health_keeps_answering(
    lone_redis, sd_runner, tmp_path
):
    view = FreshChainView(lone_redis.client())
    proxy = start_proxy(tmp_path / "proxy", lone_redis, models=models_json(),
                        endpoints={"runner-fleet": [sd_runner.url]})  # fmt: skip
    gateway = Gateway()
    try:
        info = gateway.discover(proxy, 27, SD)
        headers = gateway.headers(info, 27, SD, tickets=50)
        lone_redis.process.send_signal(signal.SIGSTOP)
        with ThreadPoolExecutor(2) as pool:
            # While a discovery waits on the stopped Redis, health still answers.
            discovering = pool.submit(grpc_status, proxy, Gateway())
            with proxy.http() as client:
                assert client.get("/healthz", timeout=30).status_code == 200
            assert discovering.result(timeout=60) == (
                grpc.StatusCode.UNAVAILABLE,
                "insufficient capacity: the orchestrator's store is unavailable",
            )
        with proxy.http() as client:
            job = client.post("/text-to-image", json=T2I, headers=headers, timeout=60)
            ready = client.get("/readyz", timeout=30)
        assert (job.status_code, job.text) == (
            503, "insufficient capacity: the orchestrator's store is unavailable\n"
        )  # fmt: skip
        assert (ready.status_code, ready.text) == (503, "not ready: Redis is unavailable\n")

        lone_redis.process.send_signal(signal.SIGCONT)
        with proxy.http() as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30,
                     what="readiness back with Redis")  # fmt: skip
            assert client.post("/text-to-image", json=T2I, headers=headers).status_code == 200
    finally:
        lone_redis.process.send_signal(signal.SIGCONT)
        stop_proxy(proxy)
        view.stop.set()


# -- 8. metrics off the public port ------------------------------------------------------------
def rejected_count(reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubepeer_tickets_rejected_total" and sample.labels == {
                "reason": reason
            }:
                return sample.value
    return 0.0


def test_revenue_and_ticket_counts_are_not_on_the_gateway_facing_port(proxy):
    with proxy.http() as client:
        assert client.get("/metrics").status_code == 404
    private = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)
    assert private.status_code == 200
    assert "kubepeer_proxy_fees_wei_total" in private.text


def replayed(proxy, gateway, info):
    headers = gateway.headers(info, 27, SD, tickets=50)
    assert post_t2i(proxy, headers).status_code == 200
    return post_t2i(proxy, headers)  # the same tickets again


@pytest.mark.parametrize(
    ("reason", "attack"),
    [("unknown-price",
      lambda p, g, i: post_t2i(p, g.headers(i, 27, SD, tickets=1, price=(1, 1000)))),
     ("insufficient-balance", lambda p, g, i: post_t2i(p, g.headers(i, 27, SD, tickets=0))),
     ("replayed-nonce", replayed)],
)  # fmt: skip
def test_every_refused_payment_is_counted_by_its_reason(proxy, reason, attack):
    before = rejected_count(reason)
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    assert attack(proxy, gateway, info).status_code == 400
    assert rejected_count(reason) == before + 1


# -- 3 and 4. bodies that stall, or never end --------------------------------------------------
def rss(pid: int) -> int:
    """Resident memory of a process, bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def stalled_post(proxy: ProxyServer, declared: int, sent: int, headers: dict[str, str]):
    """A TLS connection that declares `declared` body bytes and sends `sent` of them."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    sock = context.wrap_socket(raw)
    lines = ["POST /text-to-image HTTP/1.1", "Host: proxy", "Content-Type: application/json",
             f"Content-Length: {declared}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    piece = b" " * 65536
    try:
        for _ in range(sent // len(piece)):
            sock.sendall(piece)
    except OSError:
        pass  # the proxy refused and closed while we were still sending
    return sock


def test_stalled_unpaid_bodies_are_refused_before_they_are_buffered(proxy):
    """32 POSTs declaring just under 64 MiB send 4 MiB each and stall: without payment,
    nothing of a large body is read (it held 2.3 GB, 60 MiB each, for as long as the
    attacker waited)."""
    before = rss(proxy.process.pid)
    stranger = Gateway()
    info = stranger.discover(proxy, 27, SD)
    forged = {**stranger.headers(info, 27, SD), "Livepeer-Payment": "%%%"}
    sockets = [stalled_post(proxy, 64 * 2**20 - 1, 4 * 2**20, h)
               for h in [{}] * 16 + [forged] * 16]  # fmt: skip
    try:
        answers = []
        for sock in sockets:
            sock.settimeout(30)
            answers.append(sock.recv(4096).split(b"\r\n", 1)[0])
        # No credentials: 403 (an empty Livepeer-Payment decodes); a forged payment: 402.
        assert answers == [b"HTTP/1.1 403 Forbidden"] * 16 + [b"HTTP/1.1 402 Payment Required"] * 16
        assert rss(proxy.process.pid) - before < 32 * 2**20  # they sent 128 MiB
    finally:
        for sock in sockets:
            sock.close()


def test_refused_over_limit_bodies_do_not_pile_up_in_memory(redis_server, sd_runner, chain_facts,
                                                             tmp_path):  # fmt: skip
    """Chunked bodies past the limit, from a gateway whose credentials pass: each is refused
    with 413, and memory stays flat (it grew by the limit per refusal until a GC ran)."""
    limit = 8 * 2**20
    server = start_proxy(tmp_path / "proxy", redis_server, models=models_json(),
                         endpoints={"runner-fleet": [sd_runner.url]},
                         args=["--max-body-bytes", str(limit)])  # fmt: skip
    try:
        gateway = Gateway()
        info = gateway.discover(server, 27, SD)
        headers = gateway.headers(info, 27, SD, tickets=0)

        def endless():
            piece = b" " * 2**20
            for _ in range(limit // len(piece) + 2):
                yield piece

        with server.http() as client:
            first = client.post("/text-to-image", content=endless(), headers=headers)
            assert (first.status_code, first.text) == (
                413, f"request body exceeds the limit of {limit} bytes\n"
            )  # fmt: skip
            before = rss(server.process.pid)
            for _ in range(30):
                refused = client.post("/text-to-image", content=endless(), headers=headers)
                assert refused.status_code == 413
        assert rss(server.process.pid) - before < 3 * limit  # 30 refusals of 8 MiB each
    finally:
        stop_proxy(server)


def test_a_paid_large_body_that_stalls_is_ended_by_the_idle_timeout(
    redis_server, sd_runner, chain_facts, tmp_path
):
    """Credentials that pass let a large body be read; one that stops mid-way holds its
    bytes for the read idle timeout at most (408 `request body stalled`), not until the
    client gives up."""
    server = start_proxy(tmp_path / "proxy", redis_server, models=models_json(),
                         endpoints={"runner-fleet": [sd_runner.url]},
                         args=["--read-idle-timeout", "1"])  # fmt: skip
    try:
        gateway = Gateway()
        info = gateway.discover(server, 27, SD)
        sock = stalled_post(server, 8 * 2**20, 2 * 2**20, gateway.headers(info, 27, SD))
        text, answer = b"request body stalled: nothing for 1 s\n", b""
        try:
            sock.settimeout(30)
            while text not in answer and (piece := sock.recv(4096)):
                answer += piece  # the head, then the text
        finally:
            sock.close()
        assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 408 Request Timeout", answer
        assert answer.endswith(text), answer
    finally:
        stop_proxy(server)
