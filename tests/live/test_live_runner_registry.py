"""Runners that are not pods (issue 26, item 4): dynamic registration by heartbeat on the
proxy (live-runner-wire.md 2.3, 2.4), checked against the wire document's section 10
(items 5-10, 28) with raw requests, and end to end with the official SDK on both sides:
an app registered by the SDK's `register_runner` (heartbeats, o2r events) is discovered,
reserved and called by the SDK's client functions through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubepeer.controller.fleet import View
from kubepeer.controller.registration import Registrar
from tests.conftest import free_port
from tests.proxies import ProxyServer, models_json, start_proxy, stop_proxy
from tests.runners import SDK_APPS, SDK_PYTHON, sdk_apps, serve_app
from tests.support import wait_for

pytestmark = pytest.mark.redis

SECRET = "orchestrator-secret-for-tests"
SDK_RUNNER_APP = Path(__file__).with_name("sdk_runner_app.py")
TTL = 3  # the proxy's heartbeat TTL here (go-livepeer's is 20 s: a flag, so tests need not wait)


@pytest.fixture(scope="module")
def registry(redis_server, tmp_path_factory) -> Iterator[tuple[ProxyServer, ProxyServer, str]]:
    workdir = tmp_path_factory.mktemp("live-runner-registry")
    app = serve_app("echo", workdir / "echo.log")
    echo = next(app)
    (workdir / "secret").write_text(SECRET + "\n")  # trimmed, as go-livepeer reads its file
    (workdir / "bearer").write_text("t")
    private = ["--no-payments", "--bearer-token-file", str(workdir / "bearer"),
               "--offchain-gateways"]  # fmt: skip
    empty = models_json(extra=[], base=False)
    proxy = start_proxy(workdir / "a", redis_server, models=empty, endpoints={}, apps={
        "version": 1, "apps": []}, recipient=None, namespace="registry", args=[
        *private, "--orch-secret-file", str(workdir / "secret"), "--loopback-runners",
        "--runner-heartbeat-ttl", str(TTL)])  # fmt: skip
    closed = start_proxy(workdir / "b", redis_server, models=empty, endpoints={},
                         apps={"version": 1, "apps": []}, recipient=None, namespace="closed",
                         args=private)  # fmt: skip
    yield proxy, closed, echo
    stop_proxy(closed)
    stop_proxy(proxy)
    app.close()


def beat(http: httpx.Client, secret: str, **body) -> httpx.Response:
    return http.post("/runners/heartbeat", json=body, headers={"Authorization": secret})


def listed(http: httpx.Client) -> dict[str, dict]:
    runners = http.get("/discovery").json()[0].get("runners", [])
    return {r["url"].rsplit("/apps/", 1)[1].split("/")[0]: r for r in runners}


def test_05_06_07_09_a_first_heartbeat_registers_and_follow_ups_keep_it(registry):
    proxy, closed, echo = registry
    gpu = {"id": "GPU-1", "name": "L40S", "vram_mb": 46068}
    state = {"runner_url": echo, "app": "acme/echo", "capacity": 2, "version": "3",
             "metadata": "hello", "gpu": gpu}  # fmt: skip
    with proxy.http() as http:
        first = beat(http, SECRET, **state)  # 5
        assert first.status_code == 200, first.text
        body = first.json()
        runner_id = body["runner_id"]
        assert runner_id.startswith("runner_")
        assert len(runner_id) == len("runner_") + 8
        assert body["orchestrator"] == proxy.url
        assert (body["heartbeat_interval"], body["heartbeat_ttl"]) == ("5s", f"{TTL}s")
        assert len(body["heartbeat_secret"]) == 52
        assert body["session_ids"] == []
        o2r = body["o2r"]
        assert o2r["name"] == "o2r"
        assert o2r["mime_type"] == "application/json"
        assert o2r["channel_name"].startswith(f"{runner_id}-")
        assert o2r["channel_name"].endswith("-o2r")
        assert o2r["url"] == f"{proxy.url}/ai/trickle/{o2r['channel_name']}"
        entry = listed(http)[runner_id]  # discovered as any app, its runner_url never shown
        assert entry["url"] == f"{proxy.url}/apps/{runner_id}/session"
        assert (entry["app"], entry["capacity"], entry["version"]) == ("acme/echo", 2, "3")
        assert echo not in json.dumps(entry)
        secret = body["heartbeat_secret"]
        again = beat(http, secret, runner_id=runner_id, **state)  # 7
        assert again.status_code == 200, again.text
        assert "heartbeat_secret" not in again.json()
        assert "o2r" not in again.json()
        refused = beat(http, SECRET, runner_id=runner_id, **state)  # 7: not the bootstrap one
        assert (refused.status_code, refused.text) == (401, "invalid heartbeat authorization\n")
        session = http.post(f"/apps/{runner_id}/session", json={}).json()
        assert beat(http, secret, runner_id=runner_id, **state).json()["session_ids"] == [
            session["session_id"]]  # fmt: skip
        hidden = beat(http, secret, runner_id=runner_id, **{**state, "status": "draining"})
        assert hidden.status_code == 200
        assert runner_id not in listed(http)  # not ready: hidden, reservations 404
        assert http.post(f"/apps/{runner_id}/session", json={}).status_code == 404
        gone = http.post(f"/runners/{runner_id}/unregister", headers={"Authorization": "x"})
        assert (gone.status_code, gone.text) == (401, "invalid authorization\n")
        gone = http.post(f"/runners/{runner_id}/unregister", headers={"Authorization": secret})
        assert gone.status_code == 204  # 9: its sessions released
        assert http.get(f"{session['app_url']}/health").status_code == 404
        assert http.post(f"/runners/{runner_id}/unregister",
                         headers={"Authorization": secret}).status_code == 404  # fmt: skip
    with closed.http() as http:  # 6: a proxy with no orchestrator secret registers nobody
        off = beat(http, SECRET, **state)
        assert (off.status_code, off.text) == (
            404,
            "dynamic live runner registration is disabled\n",
        )


def test_06_10_a_wrong_secret_or_a_bad_registration_is_refused_naming_the_field(registry):
    proxy, _, echo = registry
    good = {"runner_url": echo, "app": "acme/echo"}
    cases = [  # 10
        ({"runner_url": "/relative"}, "runner_url"),
        ({"runner_url": "ftp://host/x"}, "runner_url"),
        ({"app": " acme/echo"}, "app"),
        ({"app": ""}, "app"),
        ({"metadata": "x" * 1025}, "metadata"),
        ({"status": "READY"}, "status"),
        ({"capacity": -1}, "capacity"),
        ({"mode": "batch"}, "mode"),
        ({"runner_id": "a/b"}, "runner_id"),
    ]
    with proxy.http() as http:
        wrong = beat(http, "not-the-secret", **good)  # 6
        assert (wrong.status_code, wrong.text) == (401, "invalid registration authorization\n")
        for change, field in cases:
            refused = beat(http, SECRET, **{**good, **change})
            assert refused.status_code == 400, (change, refused.text)
            assert refused.text.startswith(field), (change, refused.text)
        assert http.post("/runners/heartbeat", content=b"{not json",
                         headers={"Authorization": SECRET}).status_code == 400  # fmt: skip


def test_08_a_silent_runner_is_removed_with_its_sessions_and_may_register_again(registry):
    proxy, _, echo = registry
    with proxy.http() as http:
        body = beat(http, SECRET, runner_url=echo, app="acme/quiet").json()
        runner_id, secret = body["runner_id"], body["heartbeat_secret"]
        session = http.post(f"/apps/{runner_id}/session", json={}).json()
        assert http.get(f"{session['app_url']}/health").status_code == 200
        # 8: silent past the TTL, it leaves discovery, its session URLs answer 404.
        wait_for(lambda: runner_id not in listed(http), timeout=TTL + 5, what="expiry")
        assert http.get(f"{session['app_url']}/health").status_code == 404
        late = beat(http, secret, runner_id=runner_id, runner_url=echo, app="acme/quiet")
        assert late.status_code in (404, 401)  # expired: not found; once swept: a new id
        wait_for(lambda: beat(http, SECRET, runner_id=runner_id, runner_url=echo,
                              app="acme/quiet").status_code == 200,
                 timeout=15, what="the sweep, then a fresh registration")  # fmt: skip
        assert runner_id in listed(http)
        stopped = http.post(f"/apps/{runner_id}/session/{session['session_id']}/stop")
        assert stopped.status_code == 204


@pytest.fixture(scope="module")
def sdk_app(tmp_path_factory) -> Iterator[str]:
    """tests/live/sdk_runner_app.py: an app that uses the SDK's runner-side calls."""
    port = free_port()
    log = tmp_path_factory.mktemp("sdk-app") / "app.log"
    process = subprocess.Popen([str(SDK_PYTHON), str(SDK_RUNNER_APP), str(port)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=30, what="the SDK app")
    yield url
    process.terminate()
    process.wait(10)


def test_28_an_sdk_registered_app_is_discovered_reserved_and_told_of_its_sessions(
    registry, sdk_app, tmp_path
):
    proxy, _, _ = registry
    until = tmp_path / "done"
    runner = subprocess.Popen(
        [str(SDK_PYTHON), str(SDK_APPS), "register", proxy.url, SECRET, sdk_app,
         "acme/sdk-app", str(until)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = runner.stdout.readline()
        assert first.startswith("registered "), runner.stderr.read()[-3000:]
        runner_id = first.split()[1]
        session = sdk_apps("reserve", proxy.url, "acme/sdk-app")
        sid = session["session_id"]
        assert session["control_url"] == f"{proxy.url}/apps/{runner_id}/session/{sid}"
        with proxy.http() as http:  # the app's own SDK calls, through the session headers
            made = http.post(f"{session['app_url']}/channels")
            assert made.status_code == 200, made.text
            channels = {c["name"]: c for c in made.json()["channels"]}  # 25
            assert channels["in"]["channel_name"] == f"{sid}-in"
            assert channels["in"]["mime_type"] == "video/mp2t"
            assert channels["out"]["internal_url"] == f"{proxy.url}/ai/trickle/{sid}-out"
            assert http.post(f"{session['app_url']}/drop").json() == {"deleted": ["in"]}
            proxied = http.post(f"{session['app_url']}/proxy").json()  # 27
            assert http.get(f"{proxied['url']}/health").json() == {"status": "OK"}
            assert http.post(f"{session['app_url']}/done").json() == {"stopped": True}
            assert http.get(f"{session['app_url']}/health").status_code == 404
        heard = [runner.stdout.readline().split() for _ in range(2)]  # as the runner hears them
        assert heard == [["reserved", sid], ["released", sid]]  # 28
        until.touch()
        out, _ = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["runner_id"] == runner_id
    assert all(e["timestamp"].endswith("Z") for e in report["events"])
    with proxy.http() as http:  # the SDK unregisters on close
        assert runner_id not in listed(http)


def test_the_operators_registrations_survive_its_restart(registry, redis_server):
    """Issue 27: the operator's registrar keeps what it holds in Redis, so a restarted
    operator goes on heartbeating with the same secrets: the orchestrator keeps the runner
    (and its sessions) instead of expiring it. Here the registrar runs on a view of its own
    (the operator's kopf indices, as plain dicts); the orchestrator is the proxy's registry."""
    proxy, _, _ = registry
    key = ("ops", "live-echo")
    body = {"metadata": {"name": "echo", "namespace": "ops"},
            "spec": {"app": "acme/operated", "image": "x", "registerWith": [
                {"url": proxy.url, "secretRef": {"name": "kubepeer-orchestrator"},
                 "insecureSkipVerify": True}]}}  # fmt: skip
    pod = {"metadata": {"name": "echo-abc"}, "spec": {"nodeName": None},
           "status": {"podIP": "10.20.30.40",
                      "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
    view = View(live_runners={key: [body]}, live_pods={key: [pod]})
    store = redis_server.client()

    def registrar() -> Registrar:
        return Registrar(view, lambda *_: SECRET, lambda _: None, lambda _: (None, None),
                         lambda _: None, store=store, settle_seconds=0.5)  # fmt: skip

    async def run(r: Registrar, until: float) -> None:
        try:
            while time.monotonic() < until:
                await r.tick(time.monotonic())
                await asyncio.sleep(0.2)
        finally:
            await r.close()

    first = registrar()
    asyncio.run(run(first, time.monotonic() + 1.5))
    [(pair, held)] = first.held.items()
    assert pair == (proxy.url, "ops.echo-abc")
    with proxy.http() as http:
        assert "ops.echo-abc" in listed(http)
        restarted = registrar()  # a new operator process: nothing in memory
        asyncio.run(run(restarted, time.monotonic() + 1.5))
        assert restarted.held[pair].secret == held.secret  # heartbeats went on with it
        assert not restarted.summaries[(key, proxy.url)].last_error
        assert "ops.echo-abc" in listed(http)
        view.live_pods[key] = []  # the replica goes: unregistered, and no longer stored
        asyncio.run(run(restarted, time.monotonic() + 1.0))
        assert "ops.echo-abc" not in listed(http)
    assert not store.hgetall("kubepeer:registrations")
