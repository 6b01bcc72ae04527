"""A live stream's start, capacity, payments and end, as a go-livepeer gateway sees them
(gateway-wire 1.2, 2.2, 3.5, 5.1): a real proxy over TLS, real Redis, and a real runner
serving live-video-to-video (the `noop` model: these tests are about the orchestrator's
side; the frames themselves are test_live_sdk.py's).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from fractions import Fraction

import grpc
import httpx
import pytest

from kubepeer.livepeer import net_pb2
from kubepeer.payments.ledger import balance_key
from kubepeer_dev.gateway_sim import Gateway, ticket_ev
from tests.proxies import RUNNER_TOKEN, FreshChainView, ProxyServer, RunnerProcess
from tests.proxies import models_json as table
from tests.proxies import start_proxy as proxy_process
from tests.proxies import start_runner as runner_process
from tests.proxies import stop as stop_runner
from tests.proxies import stop_proxy as end_proxy
from tests.support import wait_for

pytestmark = pytest.mark.redis

LIVE, NOOP = 35, "noop"
PIXELS_PER_SECOND = 1280 * 720 * 30  # gateway-wire 3.5
PRICE = "72"  # wei per pixel: ~2e9 wei a second, so one ticket (EV 8e9) pays ~4 s


def paid_proxy(workdir, redis_server, runner_url: str, price: str = PRICE, shared=None,
               args: tuple[str, ...] = (), namespace: str = "test") -> ProxyServer:  # fmt: skip
    """A paid proxy serving one live model of capacity 1 on the runner at runner_url."""
    live = {"aimodel": "live", "pipeline": "live-video-to-video", "model_id": NOOP,
            "runner": "runner-live"}  # fmt: skip
    return proxy_process(
        workdir, redis_server, models=table(price, 1, [live], base=False), shared=shared,
        endpoints={"runner-live": [runner_url]}, args=["--live-payment-interval", "1", *args],
        namespace=namespace,
    )  # fmt: skip


def live_runner(workdir) -> RunnerProcess:
    """A live runner serving the `noop` model (64 streams at once: tests' leftovers fit)."""
    return runner_process(
        {"PIPELINE": "live-video-to-video", "MODEL_ID": NOOP, "AUTH_TOKEN": RUNNER_TOKEN,
         "MODEL_DIR": str(workdir)},
        workdir / "runner.log",
    )  # fmt: skip


@pytest.fixture(scope="module")
def shared_runner(tmp_path_factory, redis_server) -> Iterator[RunnerProcess]:
    """One live runner for the module's tests, and the chain watcher's view kept fresh: a
    stream is keyed by its own id, so tests share the runner as gateways share a node."""
    chain = FreshChainView(redis_server.client())
    runner = live_runner(tmp_path_factory.mktemp("live-runner"))
    yield runner
    chain.stop.set()
    stop_runner(runner)


@pytest.fixture
def stack(tmp_path, redis_server, shared_runner):
    """A paid proxy of its own (its own namespace: capacity and streams apart from other
    tests') in front of the module's live runner."""
    proxy = paid_proxy(tmp_path / "proxy", redis_server, shared_runner.url,
                       namespace=f"live-{uuid.uuid4().hex[:8]}")  # fmt: skip
    yield proxy, shared_runner
    end_proxy(proxy, grace=3)  # the runner's readers would hold its graceful stop


def start(
    proxy: ProxyServer, gateway: Gateway, info: net_pb2.OrchestratorInfo | None = None
) -> httpx.Response:
    info = info or gateway.discover(proxy, LIVE, NOOP)
    ids = uuid.uuid4().hex[:8]  # a gateway's request and stream ids are its own per stream
    body = {"model_id": NOOP, "params": {"prompt": "a cat"}, "gateway_request_id": f"req-{ids}",
            "stream_id": f"stream-{ids}"}  # fmt: skip
    with proxy.http() as client:
        return client.post("/live-video-to-video", json=body,
                           headers=gateway.headers(info, LIVE, NOOP))  # fmt: skip


def discover_error(proxy: ProxyServer, ignore_capacity: bool = False) -> str | None:
    request = Gateway().request(LIVE, NOOP)
    request.ignore_capacity_check = ignore_capacity
    with proxy.channel() as channel:
        call = channel.unary_unary(
            "/net.Orchestrator/GetOrchestrator",
            request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
            response_deserializer=net_pb2.OrchestratorInfo.FromString,
        )
        try:
            call(request, timeout=10)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return None


def live_constraint(proxy: ProxyServer) -> net_pb2.Capabilities.ModelConstraint:
    request = Gateway().request(None, None)  # the background poll: no capability asked
    with proxy.channel() as channel:
        call = channel.unary_unary(
            "/net.Orchestrator/GetOrchestrator",
            request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
            response_deserializer=net_pb2.OrchestratorInfo.FromString,
        )
        info = call(request, timeout=10)
    assert info.capabilities.bitstring[0] >> LIVE & 1  # cap 35 advertised
    return info.capabilities.constraints.per_capability[LIVE].models[NOOP]


def test_a_start_answers_absolute_channel_urls_and_creates_the_four_channels(stack):
    proxy, _ = stack
    started = time.monotonic()
    reply = start(proxy, Gateway())
    took = time.monotonic() - started
    assert reply.status_code == 200, reply.text
    body = reply.json()
    mid = body["manifest_id"]
    assert body["publish_url"] == f"{proxy.url}/ai/trickle/{mid}"
    assert body["subscribe_url"] == f"{proxy.url}/ai/trickle/{mid}-out"
    assert body["control_url"] == f"{proxy.url}/ai/trickle/{mid}-control"
    assert body["events_url"] == f"{proxy.url}/ai/trickle/{mid}-events"
    with proxy.http() as client:
        for name in ("publish_url", "subscribe_url", "control_url", "events_url"):
            assert client.get(body[name] + "/next").status_code == 200  # exists, seq 0 next
        assert client.get(f"/ai/trickle/{mid}-nope/next").status_code == 404
    assert took < 5  # the gateway's whole budget for this call (submitLiveVideoToVideo)


def test_a_second_stream_on_a_capacity_one_model_is_refused_at_discovery_and_start(stack):
    proxy, _ = stack
    assert live_constraint(proxy).capacity == 1
    late = Gateway()
    late_info = late.discover(proxy, LIVE, NOOP)  # discovered while there was room
    first = start(proxy, Gateway())
    assert first.status_code == 200, first.text
    constraint = live_constraint(proxy)
    assert (constraint.capacity, constraint.capacity_in_use) == (0, 1)
    assert discover_error(proxy) == "UNKNOWN: Invalid orchestrator request: OrchestratorCapped"
    assert discover_error(proxy, ignore_capacity=True) is None  # live payment refreshes
    second = start(proxy, late, late_info)
    assert (second.status_code, second.text) == (503, "insufficient capacity\n")
    # The gateway ends the first stream by closing its input channel: the slot comes back.
    with proxy.http() as client:
        assert client.delete(first.json()["publish_url"]).status_code == 200
    wait_for(lambda: live_constraint(proxy).capacity == 1, timeout=10, what="capacity back")
    assert start(proxy, Gateway()).status_code == 200


def test_the_checks_run_in_go_livepeers_order(stack):
    proxy, _ = stack
    with proxy.http() as client:
        bad_json = client.post("/live-video-to-video", content=b"{",
                               headers={"content-type": "application/json"})  # fmt: skip
        assert bad_json.status_code == 400
        # capacity (503) comes before the payment header (402): an unknown model
        unknown = client.post("/live-video-to-video", json={"model_id": "nope"})
        assert (unknown.status_code, unknown.text) == (503, "insufficient capacity\n")
        unpaid = client.post("/live-video-to-video", json={"model_id": NOOP},
                             headers={"Livepeer-Payment": "%%%"})  # fmt: skip
        assert unpaid.status_code == 402
        gateway = Gateway()
        info = gateway.discover(proxy, LIVE, NOOP)
        headers = gateway.headers(info, LIVE, NOOP)
        headers["Livepeer-Segment"] = "not base64!"
        assert client.post("/live-video-to-video", json={"model_id": NOOP},
                           headers=headers).status_code == 403  # fmt: skip
        broke = gateway.headers(info, LIVE, NOOP, tickets=0)  # no tickets, no credit
        refused = client.post("/live-video-to-video", json={"model_id": NOOP}, headers=broke)
        assert (refused.status_code, refused.text) == (400, "Insufficient balance\n")
    # A refused start holds no capacity.
    assert live_constraint(proxy).capacity == 1


def test_interval_payments_are_credited_and_the_stream_is_debited_per_second(stack, redis_server):
    proxy, _ = stack
    gateway = Gateway()
    info = gateway.discover(proxy, LIVE, NOOP)
    credits = [ticket_ev(info)]
    reply = start(proxy, gateway)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    mid = body["manifest_id"]
    redis = redis_server.client()
    started = time.monotonic()
    payments = 0
    closed_at = None
    with proxy.http() as client:
        seq = 0
        while time.monotonic() - started < 40:
            posted = client.post(f"{body['publish_url']}/{seq}", content=b"\x47" * 188)
            if posted.status_code == 404:  # the orchestrator closed the stream
                closed_at = time.monotonic()
                break
            seq += 1
            if payments < 3 and time.monotonic() - started > payments + 1:
                headers = gateway.headers(info, LIVE, NOOP, manifest=mid)
                paid = client.post("/payment", headers=headers)
                assert paid.status_code == 200, paid.text
                result = net_pb2.PaymentResult.FromString(paid.content)
                assert result.info.ticket_params.recipient_rand_hash  # fresh params
                assert result.info.auth_token.session_id == info.auth_token.session_id
                info.ticket_params.CopyFrom(result.info.ticket_params)
                credits.append(ticket_ev(info))
                payments += 1
            time.sleep(0.25)
    assert payments == 3
    assert closed_at is not None, "a stream whose gateway stopped paying was not closed"
    record = redis.hgetall(f"kubepeer:live:stream:{mid}")
    assert record[b"reason"].decode().startswith("insufficient balance")
    debits = json.loads(record[b"debits"])
    # Debited at the price the gateway was offered and pays (AutoAdjustPrice included).
    price = Fraction(info.price_info.price_per_unit, info.price_info.pixels_per_unit)
    assert price >= Fraction(PRICE)
    for debit in debits:
        assert debit["seconds"] >= 1  # the interval
        assert debit["pixels"] == int(PIXELS_PER_SECOND * debit["seconds"])
        assert debit["fee_wei"] == -(-debit["pixels"] * price.numerator // price.denominator)
    balance = int(redis.get(balance_key(gateway.address, mid)))
    assert balance == sum(credits) - sum(d["fee_wei"] for d in debits)
    assert 0 <= balance < PIXELS_PER_SECOND * price * 2  # what was left could not pay on
    charged_seconds = sum(d["seconds"] for d in debits)
    lived = closed_at - started
    assert lived - 2.5 <= charged_seconds <= lived + 0.5  # every second paid, none twice


def test_a_runner_killed_mid_stream_ends_the_stream_and_frees_its_slot(
    tmp_path, redis_server, shared_runner
):
    runner = live_runner(tmp_path)  # its own: this test kills it
    proxy = paid_proxy(tmp_path / "proxy", redis_server, runner.url, namespace="live-killed")
    try:
        killed_stream_ends(proxy, runner)
    finally:
        end_proxy(proxy)
        if runner.process.poll() is None:
            stop_runner(runner)


def killed_stream_ends(proxy: ProxyServer, runner: RunnerProcess) -> None:
    reply = start(proxy, Gateway())
    assert reply.status_code == 200, reply.text
    out = reply.json()["subscribe_url"]
    with proxy.http() as client:
        runner.process.kill()
        runner.process.wait()
        killed = time.monotonic()
        # The gateway's reader of the output channel, waiting for the first segment:
        ended = client.get(f"{out}/0")
    assert ended.headers.get("lp-trickle-closed") == "terminated"
    assert time.monotonic() - killed < 30  # inside the gateway's 30 s output watchdog
    assert live_constraint(proxy).capacity_in_use == 0


def test_a_dead_replicas_stream_is_adopted_by_another_and_still_charged(
    stack, tmp_path, redis_server
):
    _, runner = stack
    # Two replicas sharing their secrets; 7 wei a pixel: one ticket pays ~40 s.
    first, second = (
        paid_proxy(tmp_path / name, redis_server, runner.url, price="7",
                   shared=tmp_path / "first", args=("--live-lease-seconds", "3"))
        for name in ("first", "second")
    )  # fmt: skip
    try:
        gateway = Gateway()
        reply = start(first, gateway)
        assert reply.status_code == 200, reply.text
        mid = reply.json()["manifest_id"]
        redis = redis_server.client()
        with second.http() as client:

            def publish_and_debits_after(moment: float) -> bool:
                client.post(f"/ai/trickle/{mid}/-1", content=b"\x47" * 188)
                debits = json.loads(redis.hget(f"kubepeer:live:stream:{mid}", "debits"))
                return any(d["at"] > moment for d in debits)

            wait_for(lambda: publish_and_debits_after(0), timeout=15, what="a first debit")
            first.process.kill()  # the replica watching the stream dies without a word
            first.process.wait()
            died = time.time()
            wait_for(lambda: publish_and_debits_after(died), timeout=40,
                     what="the stream charged again, by the surviving replica")  # fmt: skip
            assert client.delete(f"/ai/trickle/{mid}").status_code == 200  # the gateway stops
        wait_for(lambda: redis.hget(f"kubepeer:live:stream:{mid}", "closed"), timeout=15,
                 what="the adopted stream closed")  # fmt: skip
        reason = redis.hget(f"kubepeer:live:stream:{mid}", "reason")
        assert reason == b"input channel closed"
    finally:
        end_proxy(first)
        end_proxy(second)


def test_streams_spread_over_every_aimodel_serving_the_model_id(
    tmp_path, redis_server, shared_runner
):
    """Two AIModels serve the same live model id (capacity 1 each, their own runners): the
    capacity advertised is both together, two streams start, one on each, and only a third
    is refused, as a batch job may also go to any AIModel serving its model id."""
    env = {"PIPELINE": "live-video-to-video", "MODEL_ID": NOOP, "AUTH_TOKEN": RUNNER_TOKEN,
           "MODEL_DIR": str(tmp_path)}  # fmt: skip
    runners = {"runner-a": shared_runner,
               "runner-b": runner_process(env, tmp_path / "runner-b.log")}  # fmt: skip
    group = [{"aimodel": f"live-{x}", "pipeline": "live-video-to-video", "model_id": NOOP,
              "runner": f"runner-{x}"} for x in "ab"]  # fmt: skip
    proxy = proxy_process(
        tmp_path / "proxy", redis_server, models=table(PRICE, 1, group, base=False),
        endpoints={name: [r.url] for name, r in runners.items()}, namespace="live-spread",
    )  # fmt: skip
    try:
        assert live_constraint(proxy).capacity == 2
        late = Gateway()
        late_info = late.discover(proxy, LIVE, NOOP)  # discovered while there was room
        first, second = start(proxy, Gateway()), start(proxy, Gateway())
        assert first.status_code == 200, first.text
        assert second.status_code == 200, second.text
        redis = redis_server.client()
        placed = {
            (redis.hget(f"kubepeer:live:stream:{r.json()['manifest_id']}", "aimodel"),
             redis.hget(f"kubepeer:live:stream:{r.json()['manifest_id']}", "runner"))
            for r in (first, second)
        }  # fmt: skip
        assert {aimodel for aimodel, _ in placed} == {b"live-a", b"live-b"}
        assert {runner.decode() for _, runner in placed} == {r.url for r in runners.values()}
        constraint = live_constraint(proxy)
        assert (constraint.capacity, constraint.capacity_in_use) == (0, 2)
        assert discover_error(proxy) == "UNKNOWN: Invalid orchestrator request: OrchestratorCapped"
        third = start(proxy, late, late_info)
        assert (third.status_code, third.text) == (503, "insufficient capacity\n")
    finally:
        end_proxy(proxy, grace=3)  # its runners' readers would hold its graceful stop
        stop_runner(runners["runner-b"])  # runner-a is the module's
