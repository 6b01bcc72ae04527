"""Paid Live Runner sessions (issue 26, item 3; live-runner-wire.md 7): the 402 challenge,
the paid retry, fixed prices, top-ups, `/refresh-payment` and metering, on a paying proxy
process with real Redis. Clients are the official gateway SDK paying through a remote
signer (hack/kubepeer_dev/remote_signer.py), and this repo's gateway for the refusals the SDK never
sends. The chain view and the senders' funds are stood in for (`chain_facts`): tickets are
judged as in every paid test. Section 10's checklist numbers are in the comments.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from eth_account import Account

from kubepeer.livepeer import net_pb2
from kubepeer.payments.ledger import balance_key
from kubepeer_dev.gateway_sim import Gateway
from tests.conftest import free_port
from tests.proxies import RECIPIENT, ProxyServer, models_json, start_proxy, stop_proxy
from tests.runners import sdk_apps, serve_app
from tests.support import wait_for

pytestmark = pytest.mark.redis
pytest_plugins = ["tests.proxies"]  # its chain_facts fixture

EV = 8_000_000_000  # the proxy's ticket EV (wei), its default
PER_SECOND = EV // 2  # wei per second: one ticket pays two seconds
FIXED = 3_000_000_000  # wei per call: one ticket pays it


def row(route: str, app: str, mode: str, price: dict | None, capacity: int = 1) -> dict:
    return {"route": route, "app": app, "mode": mode, "runner": f"live-{route}", "port": 8080,
            "capacity": capacity, "warm": "Always", "maxReplicas": 2, "proxy": False,
            "metadata": None, "version": None, "price": price}  # fmt: skip


REPLICA: dict = {}  # how the module's proxies are started: another replica starts the same
APPS = {"version": 1, "apps": [
    row("hello", "kubepeer/hello-world", "single-shot", {"wei": str(FIXED), "unit": "fixed"}),
    row("tokens", "kubepeer/tokens", "single-shot", {"wei": str(PER_SECOND), "unit": "seconds"}),
    row("echo", "kubepeer/echo", "persistent", {"wei": str(PER_SECOND), "unit": "seconds"}, 4),
    row("flat", "kubepeer/flat", "persistent", {"wei": str(FIXED), "unit": "fixed"}),
    row("unpriced", "kubepeer/unpriced", "persistent", None),
]}  # fmt: skip


@pytest.fixture(scope="module")
def paid(redis_server, chain_facts, tmp_path_factory) -> Iterator[tuple[ProxyServer, str]]:
    workdir = tmp_path_factory.mktemp("live-runner-paid")
    apps = {name: serve_app(kind, workdir / f"{name}.log")
            for name, kind in [("hello", "hello-world"), ("tokens", "tokens"),
                               ("echo", "echo")]}  # fmt: skip
    urls = {name: next(app) for name, app in apps.items()}
    endpoints = {f"live-{name}": [url] for name, url in urls.items()}
    endpoints["live-unpriced"] = endpoints["live-flat"] = [urls["echo"]]
    replica = {"models": models_json(extra=[], base=False), "endpoints": endpoints,
               "apps": APPS, "args": ["--live-payment-interval", "1"]}  # fmt: skip
    REPLICA.update(replica, shared=workdir / "proxy")
    proxy = start_proxy(workdir / "proxy", redis_server, **replica)
    other = start_proxy(workdir / "other", redis_server, **REPLICA)
    key = workdir / "payer.key"
    key.write_text(Account.create().key.hex())
    port = free_port()
    signer = subprocess.Popen(
        [sys.executable, "-m", "kubepeer_dev.remote_signer", "--key-file", str(key),
         "--port", str(port)],
        stdout=(workdir / "signer.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    signer_url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert signer.poll() is None, (workdir / "signer.log").read_text()
        try:
            return httpx.post(f"{signer_url}/sign-orchestrator-info", json={}).is_success
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=30, what="the remote signer")
    yield proxy, signer_url, other
    signer.terminate()
    signer.wait(10)
    stop_proxy(other)
    stop_proxy(proxy)
    for app in apps.values():
        app.close()


def balance(redis_server, payer: bytes, sid: str) -> int:
    return int(redis_server.client().get(balance_key(payer, sid)) or 0)


def challenge(
    http: httpx.Client, gateway: Gateway, path: str
) -> tuple[dict, net_pb2.OrchestratorInfo]:
    asked = http.post(path, json={}, headers={"Livepeer-Payer-Address": gateway.account.address})
    assert asked.status_code == 402, asked.text
    body = asked.json()
    return body, net_pb2.OrchestratorInfo.FromString(base64.b64decode(body["payment_params"]))


def paid_retry(
    http: httpx.Client, gateway: Gateway, path: str, tickets: int = 1
) -> tuple[dict, net_pb2.OrchestratorInfo, httpx.Response]:
    """The challenge for `path`, then the retry paying `tickets` for its manifest."""
    body, info = challenge(http, gateway, path)
    answer = http.post(path, json={}, headers=pay(gateway, info, body["manifest_id"], tickets))
    assert answer.status_code == 200, answer.text
    return body, info, answer


def pay(gateway: Gateway, info: net_pb2.OrchestratorInfo, manifest: str, tickets: int = 1,
        price: tuple[int, int] | None = None) -> dict[str, str]:  # fmt: skip
    headers = gateway.headers(info, None, "", tickets=tickets, manifest=manifest, price=price)
    del headers["Authorization"]  # the AI worker's header: not Live Runner's
    return headers


def test_04_discovery_prices_each_app_in_wei(paid):
    proxy, _, _ = paid
    runners = {r["app"]: r for r in sdk_apps("discover", proxy.url)["entries"][0]["runners"]}
    assert set(runners) == {"kubepeer/hello-world", "kubepeer/tokens", "kubepeer/echo",
                            "kubepeer/flat"}  # fmt: skip
    assert runners["kubepeer/hello-world"]["price_info"] == {"price": FIXED, "currency": "wei",
                                                            "unit": "fixed"}  # 4  # fmt: skip
    assert runners["kubepeer/echo"]["price_info"] == {"price": PER_SECOND, "currency": "wei",
                                                     "unit": "seconds"}  # fmt: skip
    with proxy.http() as http:  # an app with no price is neither listed nor reservable
        refused = http.post("/apps/unpriced/session", json={})
        assert refused.status_code == 503
        assert refused.text.startswith("live runner price unavailable: ")


def test_13_14_a_challenge_says_what_to_pay_and_a_bad_payer_is_refused(paid):
    proxy, _, _ = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, info = challenge(http, gateway, "/apps/echo/session")  # 13
        manifest = body["manifest_id"]
        assert (body["orchestrator"], body["payment_url"]) == (
            proxy.url, f"{proxy.url}/apps/echo/session/{manifest}/payment")  # fmt: skip
        assert len(manifest) == 8
        assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (PER_SECOND, 1)
        assert info.auth_token.session_id == manifest
        assert info.ticket_params.recipient == RECIPIENT
        assert info.address == RECIPIENT
        assert not info.HasField("capabilities")
        for payer in (None, "0x1234", "not an address"):  # 14
            headers = {} if payer is None else {"Livepeer-Payer-Address": payer}
            refused = http.post("/apps/echo/session", json={}, headers=headers)
            assert refused.status_code == 402
            assert refused.json() == {
                "error": {"message": "invalid live runner payment signer address"}}  # fmt: skip


def test_15_16_a_paid_retry_opens_the_session_once_for_its_manifest(paid, redis_server):
    proxy, _, _ = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, info = challenge(http, gateway, "/apps/echo/session")
        manifest = body["manifest_id"]
        other = pay(gateway, info, "abcdef01")  # 16: a manifest its token does not name
        refused = http.post("/apps/echo/session", json={}, headers=other)
        assert (refused.status_code, refused.text) == (403, "mismatched manifest and auth token\n")
        opened = http.post("/apps/echo/session", json={}, headers=pay(gateway, info, manifest, 3))
        assert opened.status_code == 200, opened.text  # 15
        assert opened.json()["session_id"] == manifest
        assert balance(redis_server, gateway.address, manifest) == 3 * EV  # credited, not debited
        again = http.post("/apps/echo/session", json={}, headers=pay(gateway, info, manifest))
        assert (again.status_code, again.text) == (409, "session already exists\n")
        assert http.post(f"/apps/echo/session/{manifest}/stop").status_code == 204


def test_17_a_fixed_price_is_paid_exactly_once_and_takes_no_top_ups(paid, redis_server):
    proxy, _, _ = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, info = challenge(http, gateway, "/apps/hello/app/greet")
        manifest = body["manifest_id"]
        for price in [(FIXED - 1, 1), (2 * FIXED, 2)]:  # 17: not the price, or not over 1
            wrong = pay(gateway, info, manifest, price=price)
            refused = http.post("/apps/hello/app/greet", json={}, headers=wrong)
            assert (refused.status_code, refused.text) == (
                400, "payment price does not match live runner price\n")  # fmt: skip
        called = http.post("/apps/hello/app/greet", json={}, headers=pay(gateway, info, manifest))
        assert called.status_code == 200, called.text
        assert called.json()["session"]["session-id"] == manifest
        assert balance(redis_server, gateway.address, manifest) == EV - FIXED  # debited once
        assert http.post(f"/apps/hello/session/{manifest}/payment").status_code == 404  # gone
        # A persistent session at a fixed price: paid once, it takes no top-up.
        body, info, opened = paid_retry(http, gateway, "/apps/flat/session")
        manifest = body["manifest_id"]
        assert balance(redis_server, gateway.address, manifest) == EV - FIXED
        topped = http.post(body["payment_url"], headers=pay(gateway, info, manifest))
        assert (topped.status_code, topped.text) == (
            409, "fixed-price live runner sessions do not accept follow-up payments\n")  # fmt: skip
        assert balance(redis_server, gateway.address, manifest) == EV - FIXED
        assert http.post(f"{opened.json()['control_url']}/stop").status_code == 204


def test_18_an_unpaid_metered_session_is_released_at_its_first_unaffordable_debit(
    paid, redis_server
):
    proxy, _, _ = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, info, session = paid_retry(http, gateway, "/apps/echo/session")
        manifest = body["manifest_id"]
        app_url, control = session.json()["app_url"], session.json()["control_url"]
        assert http.get(f"{app_url}/health").status_code == 200
        # One ticket pays two seconds; billed each second; the third second is unaffordable.
        wait_for(lambda: http.get(f"{app_url}/health").status_code == 404, timeout=15,
                 what="the session to be released")  # fmt: skip
        assert balance(redis_server, gateway.address, manifest) == EV - 2 * PER_SECOND
        late = http.post(f"{control}/payment", headers=pay(gateway, info, manifest))  # 18
        assert late.status_code == 404
        assert http.post(f"{control}/stop").status_code == 204


def test_19_20_top_ups_credit_the_session_and_answer_a_payment_result(paid, redis_server):
    proxy, _, _ = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, info, opened = paid_retry(http, gateway, "/apps/echo/session", tickets=5)
        manifest = body["manifest_id"]
        control = opened.json()["control_url"]
        topped = http.post(body["payment_url"], headers=pay(gateway, info, manifest, 2))  # 19
        assert topped.status_code == 200, topped.text
        result = net_pb2.PaymentResult.FromString(topped.content)
        assert result.info.auth_token == info.auth_token  # the token sent, echoed
        assert result.info.ticket_params.recipient == RECIPIENT
        assert balance(redis_server, gateway.address, manifest) >= 6 * EV  # 7 credited, <1 s used
        mismatched = http.post(body["payment_url"],
                               headers=pay(gateway, info, "0badcafe"))  # fmt: skip
        assert (mismatched.status_code, mismatched.text) == (
            403, "mismatched session and payment manifest\n")  # fmt: skip
        unknown = http.post(
            "/apps/echo/session/0badcafe/payment", headers=pay(gateway, info, manifest)
        )
        assert unknown.status_code == 404
        refreshed = http.post(
            "/refresh-payment", json={"sender": gateway.account.address, "manifest_id": manifest}
        )
        assert refreshed.status_code == 200, refreshed.text  # 20
        params = net_pb2.OrchestratorInfo.FromString(
            base64.b64decode(refreshed.json()["payment_params"]))  # fmt: skip
        assert params.auth_token.session_id == manifest
        assert params.price_info.price_per_unit == PER_SECOND
        assert refreshed.json()["payment_url"] == f"{proxy.url}/payment"
        for request, status in [
            ({"sender": gateway.account.address, "manifest_id": "0badcafe"}, 409),
            ({"sender": Gateway().account.address, "manifest_id": manifest}, 409),  # not its payer
            ({"sender": "0x12", "manifest_id": manifest}, 400),
            ({"sender": gateway.account.address}, 400),
        ]:
            assert http.post("/refresh-payment", json=request).status_code == status
        assert http.post(f"{control}/stop").status_code == 204


def test_the_sdk_pays_calls_and_keeps_a_session_funded_through_its_signer(paid, redis_server):
    proxy, signer, _ = paid
    fixed = sdk_apps("call", proxy.url, "kubepeer/hello-world", "/greet", "{}", signer)
    assert fixed["data"]["message"] == "hello, world"
    payer = bytes.fromhex(httpx.post(f"{signer}/sign-orchestrator-info", json={})
                          .json()["address"][2:])  # fmt: skip
    assert balance(redis_server, payer, fixed["session_id"]) == EV - FIXED
    payload = {"prompt": "paid tokens", "max_tokens": 4, "delay_ms": 300}
    streamed = sdk_apps("stream", proxy.url, "kubepeer/tokens", "/v1/stream", json.dumps(payload),
                   signer)  # fmt: skip
    assert streamed["lines"][-1]["line"] == "data: [DONE]"
    # A persistent session funded by the SDK every few seconds outlives what its first
    # payment (10 s) paid for: thirteen seconds held, every request through it answered.
    held = sdk_apps("hold", proxy.url, "kubepeer/echo", "13", signer)
    assert held["statuses"] == [200] * 13
    assert held["released"] is False
    assert balance(redis_server, payer, held["session_id"]) >= 0


def test_a_session_reserved_through_one_replica_is_proxied_metered_and_released_by_another(
    paid, redis_server
):
    proxy, _, other = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, _, opened = paid_retry(http, gateway, "/apps/echo/session")  # 2 s of credit
    manifest = body["manifest_id"]
    app_path = opened.json()["app_url"].removeprefix(proxy.url)
    with other.http() as http:
        assert http.get(f"{app_path}/health").status_code == 200
        wait_for(lambda: http.get(f"{app_path}/health").status_code == 404, timeout=15,
                 what="the unpaid session's release")  # fmt: skip
    assert balance(redis_server, gateway.address, manifest) == EV - 2 * PER_SECOND


def test_a_replica_killed_mid_session_loses_no_accepted_payment(paid, redis_server, tmp_path):
    _, _, other = paid
    doomed = start_proxy(tmp_path / "doomed", redis_server, **REPLICA)
    gateway = Gateway()
    redis = redis_server.client()
    try:
        with doomed.http() as http:
            body, info, opened = paid_retry(http, gateway, "/apps/echo/session", tickets=5)
            manifest = body["manifest_id"]
            topped = http.post(body["payment_url"], headers=pay(gateway, info, manifest, 2))
            assert topped.status_code == 200, topped.text
        session_key = f"kubepeer:lr:test:session:{manifest}"
        started = float(redis.hget(session_key, "billed_at"))
    finally:
        doomed.process.send_signal(signal.SIGKILL)  # mid-session, no goodbye
        doomed.process.wait(10)

    def billed_seconds() -> float:
        return float(redis.hget(session_key, "billed_at")) - started

    def accounted(tickets: int) -> bool:
        """The balance is every ticket accepted less what metering billed (read again if a
        debit landed between the two reads)."""
        billed = round(billed_seconds()) * PER_SECOND
        return balance(redis_server, gateway.address, manifest) == tickets * EV - billed

    # Every payment answered 200 is in the ledger: 7 tickets, less what metering billed.
    wait_for(lambda: accounted(7), timeout=5, what="7 tickets accounted for")
    app_path = opened.json()["app_url"].removeprefix(doomed.url)
    with other.http() as http:  # the session lives on through the other replica
        wait_for(lambda: billed_seconds() >= 3, timeout=15, what="metering by the survivor")
        assert http.get(f"{app_path}/health").status_code == 200
        more = http.post(body["payment_url"].removeprefix(doomed.url),
                         headers=pay(gateway, info, manifest))  # fmt: skip
        assert more.status_code == 200, more.text
        wait_for(lambda: accounted(8), timeout=5, what="8 tickets accounted for")
        assert http.post(opened.json()["control_url"].removeprefix(doomed.url)
                         + "/stop").status_code == 204  # fmt: skip


def test_15_a_paid_retry_must_cover_the_first_interval_and_a_call_is_its_own(paid, redis_server):
    """Beyond go-livepeer (which lets a payment with no tickets run until its first debit):
    a metered session's payment must cover its first interval, and a refused one keeps
    nothing. A single-shot call's session id reaches nothing but that call."""
    proxy, _, _ = paid
    gateway = Gateway()
    with proxy.http() as http:
        body, info = challenge(http, gateway, "/apps/echo/session")
        manifest = body["manifest_id"]
        free_ride = http.post("/apps/echo/session", json={},
                              headers=pay(gateway, info, manifest, tickets=0))  # fmt: skip
        assert (free_ride.status_code, free_ride.text) == (
            400, f"insufficient balance, mid={manifest}\n")  # fmt: skip
        assert http.post(f"/apps/echo/session/{manifest}/stop").status_code == 204  # not kept
        paid_now = http.post("/apps/echo/session", json={}, headers=pay(gateway, info, manifest))
        assert paid_now.status_code == 200, paid_now.text  # the same manifest, paid this time
        assert http.post(f"{paid_now.json()['control_url']}/stop").status_code == 204
        body, info = challenge(http, gateway, "/apps/tokens/app/v1/stream")
        call = body["manifest_id"]
        slow = {"prompt": "slow", "max_tokens": 6, "delay_ms": 400}
        headers = pay(gateway, info, call, tickets=2)
        with http.stream("POST", "/apps/tokens/app/v1/stream", json=slow,
                         headers=headers) as streaming:  # fmt: skip
            assert streaming.status_code == 200
            riding = http.get(f"/apps/tokens/session/{call}/app/v1/stream")
            assert riding.status_code == 404  # the call's session is the call's alone
            streaming.read()
