"""A go-livepeer gateway's view of the proxy, over real TLS, with real runners and Redis.

Oracles are gateway-wire.md's facts: the gateway's compatibility rule, go-livepeer's check
order and error texts, billed units and the debit rule. Balances are read from the ledger's
Redis keys (DESIGN.md, "Payments in Redis").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import math
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from fractions import Fraction

import aiohttp
import av
import grpc
import h2.connection
import h2.events
import httpx
import pytest
from aiohttp import web
from PIL import Image

from kubepeer.livepeer import net_pb2
from kubepeer.payments.ledger import balance_key
from kubepeer.proxy.server import SERVERS
from kubepeer_dev.gateway_sim import Gateway, fee, get_orchestrator, ticket_ev
from tests.gateway_rules import gateway_accepts, selectable
from tests.proxies import (
    LLAMA,
    RECIPIENT,
    RUNNER_TOKEN,
    SD,
    SVD,
    ProxyServer,
    RunnerProcess,
    go_get_orchestrator,
    models_json,
    start_proxy,
    start_runner,
    stop,
    stop_proxy,
)  # fmt: skip
from tests.support import wait_for

pytestmark = pytest.mark.redis
pytest_plugins = ["tests.proxies"]  # its chain_facts fixture

T2I = {"prompt": "a cat", "height": 32, "width": 48, "num_inference_steps": 1, "seed": 3,
       "model_id": SD}  # fmt: skip
T2I_UNITS = 32 * 48


@pytest.fixture(scope="module")
def fleet(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    """One runner serving the three models these tests use, with the operator's token."""
    models = [{"pipeline": "text-to-image", "model_id": SD}, {"pipeline": "llm", "model_id": LLAMA},
              {"pipeline": "image-to-video", "model_id": SVD}]  # fmt: skip
    env = {"MODELS": json.dumps(models), "MODEL_DIR": str(tiny_models), "AUTH_TOKEN": RUNNER_TOKEN,
           "MAX_QUEUE": "64"}  # fmt: skip
    runner = start_runner(env, tmp_path_factory.mktemp("fleet") / "runner.log")
    yield runner
    stop(runner)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, redis_server, fleet, chain_facts) -> Iterator[ProxyServer]:
    server = start_proxy(
        tmp_path_factory.mktemp("proxy"), redis_server, models=models_json(),
        endpoints={"runner-fleet": [fleet.url]}, args=["--max-body-bytes", "200000"],
    )  # fmt: skip
    yield server
    stop_proxy(server)


def balance(redis_server, gateway: Gateway, cap: int, model: str) -> int:
    raw = redis_server.client().get(balance_key(gateway.address, f"{cap}_{model}"))
    return int(raw or 0)


def free_slots(proxy, cap, model) -> int:
    info = Gateway().discover(proxy, cap, model)
    return info.capabilities.constraints.per_capability[cap].models[model].capacity


def paid_t2i(proxy, gateway, body=None, tickets=1, **kw) -> httpx.Response:
    info = gateway.discover(proxy, 27, SD)
    headers = gateway.headers(info, 27, SD, tickets=tickets, **kw)
    with proxy.http() as client:
        return client.post("/text-to-image", json=body or T2I, headers=headers)


# -- one port, two protocols ------------------------------------------------------------------
def test_grpc_and_https_share_one_tls_port_with_alpn_h2(proxy):
    info = Gateway().discover(proxy, 27, SD)
    assert info.transcoder == proxy.url
    with proxy.http(http2=True) as client:
        assert client.get("/healthz").http_version == "HTTP/2"
    with proxy.http() as client:
        assert client.get("/healthz").http_version == "HTTP/1.1"


def test_discovery_passes_the_gateways_rules_for_every_served_model(proxy):
    gateway = Gateway()
    for cap, model in [(27, SD), (33, LLAMA), (29, SVD)]:
        info = gateway.discover(proxy, cap, model)
        caps = info.capabilities
        for bit in [*range(13), 14, 26, cap]:  # requested bits subset of ours (1.4 d)
            assert caps.bitstring[bit // 64] >> (bit % 64) & 1, bit
        constraint = caps.constraints.per_capability[cap].models[model]  # (1.4 c)
        assert constraint.warm  # a ready replica exists
        assert constraint.capacity == 1
        assert constraint.runner_version
        assert tuple(map(int, caps.version.split("."))) >= (0, 9, 0)  # (1.4 a)
        assert info.address == RECIPIENT
        assert gateway_accepts(info, cap, model)  # 1.5: not blocklisted, compatible
        assert selectable(info, has_sender=True, l1_block=5_000) == ""
        assert info.auth_token.expiration - time.time() == pytest.approx(1800, abs=5)
        tp = info.ticket_params  # 1.5: valid params, EV < faceValue, EV <= 3e12
        assert int.from_bytes(tp.expiration_block, "big") - 5_000 > 1
        assert 0 < ticket_ev(info) < int.from_bytes(tp.face_value, "big")
        assert ticket_ev(info) <= 3 * 10**12
        # AutoAdjustPrice (3.2): the configured 1/4 x (1 + txCost / faceValue), 3 decimals;
        # txCost = redeemGas on L2 (1.2M, livepeer-wire) x the proxy's gas price (1e7).
        tx_cost = Fraction(1_200_000 * 10**7, int.from_bytes(tp.face_value, "big"))
        quoted = Fraction(math.floor(Fraction(1, 4) * (1 + tx_cost) * 1000), 1000)
        assert quoted > Fraction(1, 4)
        assert Fraction(info.price_info.price_per_unit, info.price_info.pixels_per_unit) == quoted
        assert not info.capabilities_prices


def test_a_bad_signature_is_refused_as_go_livepeer_does(proxy):
    gateway = Gateway()
    request = gateway.request(27, SD)
    request.sig = Gateway().request(27, SD).sig  # someone else's signature
    with proxy.channel() as channel:
        call = channel.unary_unary(
            "/net.Orchestrator/GetOrchestrator",
            request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
            response_deserializer=net_pb2.OrchestratorInfo.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNKNOWN
    assert refused.value.details() == (
        "Invalid orchestrator request: orchestrator req sig check failed"
    )


# -- paid jobs ----------------------------------------------------------------------------------
def test_a_paid_job_returns_a_url_any_replica_serves_and_is_debited_units_times_price(
    proxy, redis_server, tmp_path
):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    with proxy.http() as client:
        response = client.post("/text-to-image", json=T2I, headers=gateway.headers(info, 27, SD))
    assert response.status_code == 200, response.text
    [image] = response.json()["images"]
    assert set(image) == {"url", "seed", "nsfw"}
    assert image["url"].startswith(f"{proxy.url}/stream/")
    assert balance(redis_server, gateway, 27, SD) == ticket_ev(info) - fee(T2I_UNITS, info)

    other = start_proxy(tmp_path / "b", redis_server, models=models_json(), endpoints={},
                        shared=proxy.workdir)  # fmt: skip
    try:
        path = image["url"].removeprefix(proxy.url)
        with other.http() as client:
            fetched = client.get(path)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (48, 32)
        # The other replica accepts the auth token this one issued (one shared secret).
        with other.http() as client:
            again = client.post("/text-to-image", json=T2I, headers=gateway.headers(info, 27, SD))
        assert again.status_code == 503  # it has no runner: capacity, not credentials
        assert again.text == "insufficient capacity\n"
    finally:
        stop_proxy(other)


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_each_job_is_logged_once_with_its_request_id_as_one_json_line(proxy, http2):
    """Served and refused, on the lean HTTP/1.1 path and on HTTP/2 (uvicorn's ASGI path)."""
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    served, refused = f"served-{http2}", f"refused-{http2}"
    paid = {**gateway.headers(info, 27, SD), "X-Request-Id": served}
    with proxy.http(http2=http2) as client:
        ok = client.post("/text-to-image", json=T2I, headers=paid)
        unpaid = client.post("/text-to-image", json=T2I, headers={"X-Request-Id": refused})
    assert ok.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert (ok.status_code, ok.headers["x-request-id"]) == (200, served)
    assert (unpaid.status_code, unpaid.headers["x-request-id"]) == (403, refused)  # no segment

    def lines(request_id: str) -> list[dict]:
        entries = [json.loads(line) for line in proxy.log.read_text().splitlines()
                   if line.startswith("{")]  # fmt: skip
        return [e for e in entries if e.get("request_id") == request_id]

    wait_for(lambda: lines(served) and lines(refused), timeout=10, what="the jobs' log lines")
    [line] = lines(served)
    assert line["message"] == "job served"
    assert (line["pipeline"], line["model"], line["units"]) == ("text-to-image", SD, T2I_UNITS)
    assert line["fee_wei"] == fee(T2I_UNITS, info)
    [line] = lines(refused)
    assert (line["message"], line["status"]) == ("job refused", 403)
    assert line["reason"]  # go-livepeer's text, as the gateway got it
    assert unpaid.text == line["reason"] + "\n"


def test_without_the_ai_worker_header_images_are_data_urls(proxy):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    headers = gateway.headers(info, 27, SD)
    del headers["Authorization"]
    with proxy.http() as client:
        response = client.post("/text-to-image", json=T2I, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["url"].startswith("data:image/png;base64,")


def test_image_to_video_returns_one_playable_mp4(proxy):
    gateway = Gateway()
    info = gateway.discover(proxy, 29, SVD)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, format="PNG")
    with proxy.http() as client:
        response = client.post(
            "/image-to-video", headers=gateway.headers(info, 29, SVD),
            data={"model_id": SVD, "height": "32", "width": "48", "num_inference_steps": "1",
                  "fps": "6"},
            files={"image": ("in.png", buffer.getvalue(), "image/png")},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        [video] = response.json()["images"]
        mp4 = client.get(video["url"].removeprefix(proxy.url))
    assert mp4.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4.content)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = list(container.decode(stream))
    assert len(frames) == 3  # the tiny model's frame count
    assert {(f.width, f.height) for f in frames} == {(48, 32)}


# -- rejections: exact status and text, and the ledger untouched --------------------------------
def test_rejections_in_go_livepeers_order_change_no_balance(proxy, redis_server):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    good = gateway.headers(info, 27, SD)
    stranger = Gateway()

    def post(headers, body=None, path="/text-to-image", content=None):
        with proxy.http() as client:
            if content is not None:
                return client.post(path, content=content, headers=headers)
            return client.post(path, json=body or T2I, headers=headers)

    cases = [
        ({**good, "Livepeer-Payment": "%%%"}, None, 402, "Livepeer-Payment is not valid base64"),
        ({**good, "Livepeer-Segment": "%%%"}, None, 403, "ErrorSegEncoding"),
        (
            {**good, "Livepeer-Segment": stranger.headers(info, 27, SD)["Livepeer-Segment"]},
            None,
            403,
            "ErrSegSig",
        ),
        (good, {**T2I, "model_id": "no/such-model"}, 503, "insufficient capacity"),
        (good, {**T2I, "height": "tall"}, 400, "height must be an integer, got 'tall'"),
    ]
    for headers, body, status, text in cases:
        response = post(headers, body)
        assert response.status_code == status, (text, response.text)
        assert response.text.startswith(text)
        assert response.text.endswith("\n")
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert balance(redis_server, gateway, 27, SD) == 0

    # No ticket and no credit: the balance is below one ticket's EV.
    response = post(gateway.headers(info, 27, SD, tickets=0))
    assert (response.status_code, response.text) == (400, "Insufficient balance\n")

    # A price we never quoted to this gateway for this model, with tickets or without:
    # go-livepeer would trust a ticketless claim, we do not (and with tickets the claim is
    # refused before recipientRand, which binds params to their own price, is computed:
    # tests/unit/test_payments.py covers that binding with the price offered).
    for tickets in (1, 0):
        response = post(gateway.headers(info, 27, SD, tickets=tickets, price=(1, 1000)))
        assert (response.status_code, response.text) == (
            400, "expected price 1/1000 wei/unit was not offered to this sender for this job\n"
        )  # fmt: skip
    assert balance(redis_server, gateway, 27, SD) == 0

    # The runner's own 400 is passed on for the gateway to answer its client 400.
    response = post(gateway.headers(info, 27, SD), {**T2I, "height": 60})
    assert response.status_code == 500
    assert response.text == (
        "text-to-image container returned 400: height 60 must be a positive multiple of 8\n"
    )
    assert balance(redis_server, gateway, 27, SD) == ticket_ev(info)  # credited, not debited

    # Over the body limit: 413 naming the limit.
    response = post(good, content=b"{" + b" " * 300_000 + b"}")
    assert (response.status_code, response.text) == (
        413, "request body exceeds the limit of 200000 bytes\n")  # fmt: skip


def test_llm_without_max_tokens_is_a_400(proxy):
    gateway = Gateway()
    info = gateway.discover(proxy, 33, LLAMA)
    with proxy.http() as client:
        response = client.post(
            "/llm", json={"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]},
            headers=gateway.headers(info, 33, LLAMA),
        )  # fmt: skip
    assert (response.status_code, response.text) == (400, "MaxTokens not specified\n")


def test_the_llm_stream_arrives_chunk_by_chunk(proxy):
    gateway = Gateway()
    info = gateway.discover(proxy, 33, LLAMA)
    # Greedy: sampling, the tiny random model sometimes drew its end token within a few
    # tokens, and so short a stream comes out in one burst however it is relayed.
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 200, "stream": True, "temperature": 0}  # fmt: skip
    arrivals = []
    with (
        proxy.http() as client,
        client.stream(
            "POST", "/llm", json=body, headers=gateway.headers(info, 33, LLAMA)
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), json.loads(line[6:])))
    assert len(arrivals) >= 3
    assert arrivals[-1][1]["choices"][0]["finish_reason"]
    assert not any(c["choices"][0].get("finish_reason") for _, c in arrivals[:-1])
    spread = arrivals[-1][0] - arrivals[0][0]
    assert spread > 0.01, "all chunks arrived in one burst"


# -- capacity, retry -----------------------------------------------------------------------------
class HeldStream:
    """A stand-in llm runner that answers a stream only once `answer` is set (it has
    `arrived` by then), in its own thread and loop."""

    def __init__(self) -> None:
        self.arrived, self.answer = threading.Event(), threading.Event()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/llm", self._llm)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def _llm(self, request: web.Request) -> web.StreamResponse:
        self.arrived.set()
        while not self.answer.is_set():
            await asyncio.sleep(0.01)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        return response


def test_a_stream_whose_gateway_left_before_it_began_gives_its_slot_back(redis_server, tmp_path):
    """The gateway hangs up while the runner has not yet answered an llm stream: the job's
    reply is never written, and its slot must come back all the same (capacity 1)."""
    held = HeldStream()
    (tmp_path / "bearer").write_text("let-me-in")
    server = start_proxy(
        tmp_path, redis_server, models=models_json(capacity=1),
        endpoints={"runner-fleet": [held.url]}, plaintext=True,
        args=["--no-payments", "--bearer-token-file", str(tmp_path / "bearer")],
    )  # fmt: skip
    try:
        assert free_slots(server, 33, LLAMA) == 1
        body = json.dumps({"model": LLAMA, "messages": [{"role": "user", "content": "x"}],
                           "max_tokens": 4, "stream": True}).encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as gateway:
            gateway.sendall(
                b"POST /llm HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer let-me-in\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            assert held.arrived.wait(10), "the job did not reach the runner"
            assert free_slots(server, 33, LLAMA) == 0
        time.sleep(0.3)  # the proxy sees the gateway gone
        held.answer.set()
        wait_for(lambda: free_slots(server, 33, LLAMA) == 1, timeout=10,
                 what="the left stream's slot to come back")  # fmt: skip
    finally:
        stop_proxy(server)
        held.loop.call_soon_threadsafe(held.loop.stop)


def test_concurrent_jobs_on_capacity_one_are_served_once_or_refused(proxy, redis_server):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    headers = [gateway.headers(info, 27, SD) for _ in range(12)]

    async def burst():
        async with httpx.AsyncClient(base_url=proxy.url, verify=False, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/text-to-image", json=T2I, headers=h) for h in headers)
            )

    responses = asyncio.run(burst())
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert served
    assert all(r.text == "insufficient capacity\n" for r in refused), {r.text for r in refused}
    # Refused jobs never reach payment: only served jobs' tickets are credited (step 4 < 5).
    expected = len(served) * (ticket_ev(info) - fee(T2I_UNITS, info))
    assert balance(redis_server, gateway, 27, SD) == expected
    urls = {r.json()["images"][0]["url"] for r in served}
    assert len(urls) == len(served)


class CountingRunners:
    """Pass-throughs to the real runner, one port each, counting the jobs each has open at
    once: a replica of capacity 1 must never see two. With `gather`, each job is held until
    that many are open across them (or 10 s pass), so jobs that a router could have sent to
    one replica are open together for sure."""

    def __init__(self, upstream: str, count: int, gather: int = 0) -> None:
        self.upstream = upstream
        self.gather = gather
        self.open = [0] * count
        self.most = [0] * count
        self.jobs = [0] * count
        self.urls: list[str] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(count, started), daemon=True).start()
        assert started.wait(10)

    def _run(self, count: int, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start(count))
        started.set()
        self.loop.run_forever()

    async def _start(self, count: int) -> None:
        self.gathered = asyncio.Event()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        for index in range(count):
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/{pipeline}", functools.partial(self._forward, index=index))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")

    async def _forward(self, request: web.Request, *, index: int) -> web.Response:
        self.open[index] += 1
        self.jobs[index] += 1
        self.most[index] = max(self.most[index], self.open[index])
        try:
            if sum(self.open) >= self.gather:
                self.gathered.set()
            if self.gather:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gathered.wait(), 10)
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("content-type", "authorization")}  # fmt: skip
            async with self.http.post(
                self.upstream + request.path, data=await request.read(), headers=headers
            ) as answer:
                body = await answer.read()
                return web.Response(
                    body=body, status=answer.status,
                    headers={"content-type": answer.headers["content-type"]},
                )  # fmt: skip
        finally:
            self.open[index] -= 1


def test_200_concurrent_paid_jobs_are_each_served_once_or_refused_within_capacity(
    fleet, redis_server, chain_facts, tmp_path
):
    replicas = CountingRunners(fleet.url, 3)
    server = start_proxy(tmp_path, redis_server, models=models_json(capacity=1),
                         endpoints={"runner-fleet": replicas.urls})  # fmt: skip
    try:
        gateway = Gateway()
        info = gateway.discover(server, 27, SD)
        headers = [gateway.headers(info, 27, SD) for _ in range(200)]

        async def burst():  # one HTTP/2 connection, as go-livepeer's client multiplexes
            async with httpx.AsyncClient(
                base_url=server.url, verify=False, timeout=300, http2=True
            ) as client:
                return await asyncio.gather(
                    *(client.post("/text-to-image", json=T2I, headers=h) for h in headers)
                )

        responses = asyncio.run(burst())
    finally:
        stop_proxy(server)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(served) + len(refused) == 200  # none lost
    assert len(served) >= 3
    assert {(r.status_code, r.text) for r in refused} <= {(503, "insufficient capacity\n")}
    assert sum(replicas.jobs) == len(served)  # each served job ran once; refused ones never
    assert replicas.most == [1, 1, 1]  # capacity 1 held on every replica, and all were used
    urls = {r.json()["images"][0]["url"] for r in served}
    assert len(urls) == len(served)
    # Refused jobs never reach payment (step 4 < 5): each served job's ticket credited once
    # and its fee debited once.
    expected = len(served) * (ticket_ev(info) - fee(T2I_UNITS, info))
    assert balance(redis_server, gateway, 27, SD) == expected


def test_jobs_for_a_model_go_to_every_aimodel_serving_it(
    fleet, redis_server, chain_facts, tmp_path
):
    replicas = CountingRunners(fleet.url, 2, gather=2)
    both = [{"aimodel": name, "pipeline": "text-to-image", "model_id": SD,
             "runner": f"runner-{name}"} for name in ("sd-a", "sd-b")]  # fmt: skip
    server = start_proxy(
        tmp_path, redis_server, models=models_json(capacity=1, base=False, extra=both),
        endpoints={"runner-sd-a": replicas.urls[:1], "runner-sd-b": replicas.urls[1:]},
        args=["--max-queue", "0"],  # no waiting: a job finds a free slot or is refused
    )  # fmt: skip
    try:
        gateway = Gateway()
        info = gateway.discover(server, 27, SD)
        constraint = info.capabilities.constraints.per_capability[27].models[SD]
        assert constraint.warm
        assert constraint.capacity == 2  # both AIModels' slots
        headers = [gateway.headers(info, 27, SD) for _ in range(2)]

        async def pair():
            async with httpx.AsyncClient(
                base_url=server.url, verify=False, timeout=120, http2=True
            ) as client:
                return await asyncio.gather(
                    *(client.post("/text-to-image", json=T2I, headers=h) for h in headers)
                )

        responses = asyncio.run(pair())
        assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
        assert replicas.jobs == [1, 1]  # one on each AIModel's replica, open together
        assert balance(redis_server, gateway, 27, SD) == 2 * (
            ticket_ev(info) - fee(T2I_UNITS, info)
        )
    finally:
        stop_proxy(server)


class SocketRunner:
    """A process-local runner on a bare socket, each connection served by `serve` in a
    thread of its own."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class DyingRunner(SocketRunner):
    """Accepts a job and hangs up before answering."""

    def serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)


def test_a_runner_that_dies_before_answering_is_retried_once_elsewhere(
    proxy, fleet, redis_server, tmp_path
):
    dying = DyingRunner()
    refusing = [socket.socket(), socket.socket()]
    for sock in refusing:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    dead = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in refusing]
    server = start_proxy(tmp_path, redis_server, models=models_json(capacity=1),
                         endpoints={"runner-fleet": [dying.url, fleet.url]})  # fmt: skip
    try:
        gateway = Gateway()
        for _ in range(12):  # ties are broken at random: go until one lands on the dying one
            response = paid_t2i(server, gateway)
            assert response.status_code == 200, response.text
            if dying.accepted:
                break
        assert dying.accepted == 1
        # Now every replica fails: one retry, then the job fails (and is not debited).
        server.set_endpoints({"runner-fleet": [dying.url, *dead]})
        wait_for(lambda: free_slots(server, 27, SD) == 3, timeout=10, what="the new endpoints")
        before = balance(redis_server, gateway, 27, SD)
        response = paid_t2i(server, gateway)
        assert response.status_code == 500
        assert response.text.startswith("text-to-image container failed")
        credited = before + ticket_ev(gateway.discover(server, 27, SD))
        assert balance(redis_server, gateway, 27, SD) == credited  # no debit for a failure
    finally:
        stop_proxy(server)
        for sock in refusing:
            sock.close()
        dying.sock.close()


class ClosingRunner(SocketRunner):
    """A text-to-image runner whose server closes each kept-alive connection just as the
    next request arrives on it (the idle-close race, every time): one answer per connection."""

    ANSWER = json.dumps({"images": [{"url": "data:image/png;base64,iVBORw0KGgo=", "seed": 3,
                                     "nsfw": False}]}).encode()  # fmt: skip
    answered = 0

    def serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            self.answered += 1  # before the answer: the test may read it once the answer is in
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER)
            )
            reader.readline()  # the next request's first line: closed unanswered


def test_a_kept_alive_runner_connection_closed_as_a_job_goes_out_is_tried_afresh(
    redis_server, tmp_path
):
    """One replica, whose server drops a kept-alive connection as the next job is written
    to it: that says nothing about the runner, so the job goes to it on a new connection
    (not to another replica, of which there is none: a wait for the queue timeout, then a
    503)."""
    runner = ClosingRunner()
    (tmp_path / "bearer").write_text("let-me-in")
    server = start_proxy(
        tmp_path, redis_server, models=models_json(capacity=1),
        endpoints={"runner-fleet": [runner.url]}, plaintext=True,
        args=["--no-payments", "--bearer-token-file", str(tmp_path / "bearer"),
              "--queue-timeout", "2"],
    )  # fmt: skip
    try:
        with server.http() as client:
            for _ in range(3):
                response = client.post("/text-to-image", json=T2I, timeout=30,
                                       headers={"Authorization": "Bearer let-me-in"})  # fmt: skip
                assert response.status_code == 200, response.text
                assert response.json()["images"][0]["seed"] == 3
        assert (runner.accepted, runner.answered) == (3, 3)
    finally:
        stop_proxy(server)
        runner.sock.close()


# -- modes ----------------------------------------------------------------------------------------
def test_h2c_mode_serves_grpc_and_http_in_plaintext(redis_server, fleet, chain_facts, tmp_path):
    server = start_proxy(tmp_path, redis_server, models=models_json(),
                         endpoints={"runner-fleet": [fleet.url]}, plaintext=True)  # fmt: skip
    try:
        info = Gateway().discover(server, 27, SD)
        assert info.transcoder.startswith("http://")
        with httpx.Client(base_url=server.url, http1=False, http2=True) as client:
            assert client.get("/healthz").http_version == "HTTP/2"
    finally:
        stop_proxy(server)


@pytest.mark.parametrize("kind", SERVERS)
def test_one_http2_connection_serves_a_gateway_however_many_requests_it_sends(
    redis_server, fleet, tmp_path, kind
):
    """go-livepeer sends every job to an orchestrator over one HTTP/2 connection (1.1), and
    Go's server ends none for the number of requests on it: no GOAWAY after 1000 streams
    (hypercorn's default cap, which failed the streams in flight as it closed)."""
    server = start_proxy(
        tmp_path, redis_server, models=models_json(), endpoints={"runner-fleet": [fleet.url]},
        plaintext=True, args=["--server", kind],
    )  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            h2c = h2.connection.H2Connection()
            h2c.initiate_connection()
            statuses: list[bytes] = []
            for n in range(1100):
                stream = h2c.get_next_available_stream_id()
                h2c.send_headers(stream, [(":method", "GET"), (":path", "/healthz"),
                                          (":scheme", "http"), (":authority", "proxy")],
                                 end_stream=True)  # fmt: skip
                ended = False
                while not ended:
                    sock.sendall(h2c.data_to_send())
                    for event in h2c.receive_data(sock.recv(65536)):
                        if isinstance(event, h2.events.ConnectionTerminated):
                            pytest.fail(f"the connection was ended after {n} requests: {event}")
                        if isinstance(event, h2.events.ResponseReceived):
                            statuses.append(dict(event.headers)[b":status"])
                        if isinstance(event, h2.events.DataReceived):
                            h2c.acknowledge_received_data(event.flow_controlled_length, stream)
                        ended |= isinstance(event, h2.events.StreamEnded)
        assert statuses == [b"200"] * 1100
    finally:
        stop_proxy(server)


def test_private_mode_takes_a_bearer_token_instead_of_payment(redis_server, fleet, tmp_path):
    (tmp_path / "bearer").write_text("let-me-in")
    server = start_proxy(
        tmp_path, redis_server, models=models_json(), endpoints={"runner-fleet": [fleet.url]},
        args=["--no-payments", "--bearer-token-file", str(tmp_path / "bearer")], recipient=None,
    )  # fmt: skip
    try:
        with server.http() as client:
            refused = client.post("/text-to-image", json=T2I)
            served = client.post(
                "/text-to-image", json=T2I, headers={"Authorization": "Bearer let-me-in"}
            )
        assert (refused.status_code, refused.text) == (401, "a valid bearer token is required\n")
        assert served.status_code == 200, served.text
        # No signature check either: a payments-off orchestrator is offchain (1.2).
        request = Gateway().request(27, SD)
        request.sig = b""
        info = get_orchestrator(server, request)
        assert not info.HasField("ticket_params")
        # As go-livepeer offchain: the zero address, which a default gateway does not
        # blocklist (an empty one it does, gateway-wire 1.5).
        assert info.address == bytes(20)
        assert gateway_accepts(info, 27, SD)
        assert selectable(info, has_sender=False) == ""
    finally:
        stop_proxy(server)


# -- grpc-go, as go-livepeer dials ----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain to build grpc-go")
@pytest.mark.parametrize("plaintext", [False, True], ids=["tls", "h2c"])
def test_a_grpc_go_client_gets_orchestrator_info(redis_server, chain_facts, tmp_path, plaintext):
    server = start_proxy(tmp_path, redis_server, models=models_json(), endpoints={},
                         plaintext=plaintext)  # fmt: skip
    try:
        gateway = Gateway()
        info, error = go_get_orchestrator(server, gateway.request(27, SD))
        assert error is None, error
        assert info.transcoder == server.url
        assert SD in info.capabilities.constraints.per_capability[27].models
        bad = gateway.request(27, SD)
        bad.sig = bad.sig[:64] + b"\x00"
        info, error = go_get_orchestrator(server, bad)
        assert error == (
            "ERR Unknown: Invalid orchestrator request: orchestrator req sig check failed"
        )
    finally:
        stop_proxy(server)


def test_sigterm_ends_the_proxy_after_its_own_cleanup(redis_server, fleet, tmp_path):
    """uvicorn raises the signal again after its graceful stop; the proxy's handler takes it,
    so the process ends by returning from its cleanup (exit 0, the last demand records
    written), not killed by the signal's default action (-15)."""
    server = start_proxy(tmp_path, redis_server, models=models_json(),
                         endpoints={"runner-fleet": [fleet.url]})  # fmt: skip
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log.read_text()[-2000:]
