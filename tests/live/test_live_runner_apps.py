"""The proxy as the Live Runner apps' orchestrator (issue 26, item 3), free sessions on a
private proxy: real proxy processes on one real Redis, the example apps as real processes,
and the client side through the official gateway SDK (`livepeer-gateway`, its own venv) as
apps use it. Each assertion is a line of live-runner-wire.md (section 10's checklist
numbers in the comments), never our own code read back.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from websockets.sync.client import connect as websocket

from tests.conftest import free_port
from tests.proxies import SD, T2I, ProxyServer, models_json, start_proxy, stop_proxy
from tests.runners import sdk_apps, serve_app, start_runner
from tests.runners import stop as stop_runner
from tests.support import wait_for

pytestmark = pytest.mark.redis


def app_row(route: str, app: str, mode: str, capacity: int = 1, **extra) -> dict:
    return {"route": route, "app": app, "mode": mode, "runner": f"live-{route}", "port": 8080,
            "capacity": capacity, "warm": "Always", "maxReplicas": 2, "proxy": False,
            "metadata": None, "version": None, "price": None, **extra}  # fmt: skip


APPS = {"version": 1, "apps": [
    app_row("hello", "kubepeer/hello-world", "single-shot", version="1.0",
            metadata='{"about": "hello"}'),
    app_row("tokens", "kubepeer/tokens", "single-shot"),
    app_row("echo", "kubepeer/echo", "persistent"),
    app_row("gone", "kubepeer/gone", "single-shot"),  # its one replica answers nothing
    app_row("cold", "kubepeer/cold", "persistent"),  # Always, no ready replica: not listed
    app_row("spy", "kubepeer/spy", "persistent"),  # tells the test what it was sent
    app_row("web", "kubepeer/web", "persistent", proxy=True),  # a URL of its own per session
    app_row("hi", "kubepeer/hi", "single-shot", proxy=True),  # a URL of its own
    app_row("flaky", "kubepeer/flaky", "persistent"),  # its replica turns unready
]}  # fmt: skip
ENDPOINTS: dict[str, list[str]] = {}  # what both proxies are told is ready (their file)


class Spy(BaseHTTPRequestHandler):
    """An app replica that records each request's headers (the session token among them)."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        Spy.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None: ...


@pytest.fixture(scope="module")
def spy() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Spy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def stack(redis_server, spy, tmp_path_factory) -> Iterator[tuple[ProxyServer, ProxyServer, dict]]:
    workdir = tmp_path_factory.mktemp("live-runner-apps")
    apps = {name: serve_app(kind, workdir / f"{name}.log")
            for name, kind in [("hello", "hello-world"), ("tokens", "tokens"),
                               ("echo-a", "echo"), ("echo-b", "echo")]}  # fmt: skip
    urls = {name: next(app) for name, app in apps.items()}
    endpoints = {"live-hello": [urls["hello"]], "live-tokens": [urls["tokens"]],
                 "live-echo": [urls["echo-a"], urls["echo-b"]],
                 "live-gone": [f"http://127.0.0.1:{free_port()}"], "live-spy": [spy],
                 "live-web": [spy], "live-hi": [urls["hello"]], "live-flaky": [spy]}  # fmt: skip
    ENDPOINTS.update(endpoints)
    (workdir / "bearer").write_text("private-token")
    args = ["--no-payments", "--bearer-token-file", str(workdir / "bearer"),
            "--offchain-gateways"]  # fmt: skip
    empty = models_json(extra=[], base=False)
    first = start_proxy(workdir / "a", redis_server, models=empty, endpoints=endpoints,
                        apps=APPS, args=args, recipient=None)  # fmt: skip
    second = start_proxy(workdir / "b", redis_server, models=empty, endpoints=endpoints,
                         apps=APPS, args=args, recipient=None, shared=workdir / "a")  # fmt: skip
    yield first, second, urls
    stop_proxy(second)
    stop_proxy(first)
    for app in apps.values():
        app.close()


def reserve(proxy: ProxyServer, route: str = "echo") -> dict:
    with proxy.http() as http:
        answer = http.post(f"/apps/{route}/session", json={})
    assert answer.status_code == 200, answer.text
    return answer.json()


def stop(proxy: ProxyServer, session: dict) -> None:
    with proxy.http() as http:
        assert http.post(f"{session['control_url']}/stop").status_code == 204


def test_01_02_03_04_discovery_lists_the_ready_apps_as_the_sdk_reads_them(stack):
    proxy, _, urls = stack
    report = sdk_apps("discover", proxy.url)
    [entry] = report["entries"]  # 1: one object, our public address
    assert entry["address"] == proxy.url
    runners = {r["app"]: r for r in entry["runners"]}
    assert set(runners) == {"kubepeer/hello-world", "kubepeer/tokens", "kubepeer/echo",
                            "kubepeer/gone", "kubepeer/spy", "kubepeer/web",
                            "kubepeer/hi", "kubepeer/flaky"}  # 2: "cold" is not  # fmt: skip
    assert runners["kubepeer/hi"]["url"] == f"{proxy.url}/run/hi"  # a proxy: true single-shot
    hello, echo = runners["kubepeer/hello-world"], runners["kubepeer/echo"]
    assert hello["url"] == f"{proxy.url}/apps/hello/app"  # 3
    assert echo["url"] == f"{proxy.url}/apps/echo/session"
    assert (echo["mode"], echo["capacity"], echo["capacity_available"]) == ("persistent", 2, 2)
    assert (hello["version"], hello["metadata"]) == ("1.0", '{"about": "hello"}')
    assert all("price_info" not in r for r in runners.values())  # 4: free, so no price
    text = json.dumps(report)
    assert not any(url in text for url in urls.values())  # 2: replicas never shown
    assert sdk_apps("discover", proxy.url, "kubepeer/echo")["entries"][0]["runners"] == [echo]


def test_21_24_a_single_shot_call_reaches_the_app_with_the_session_headers(stack):
    proxy, _, _ = stack
    report = sdk_apps("call", proxy.url, "kubepeer/hello-world", "/greet/me", '{"name": "x"}')
    data = report["data"]
    assert (data["method"], data["path"], data["message"]) == ("POST", "/greet/me",
                                                               "hello, world")  # fmt: skip
    session = data["session"]  # 21: the headers set, control at the runner-facing base
    assert session["runner-route"] == "hello"
    assert session["session-id"].startswith("session_")
    assert session["session-control"] == (
        f"{proxy.url}/runner/hello/session/{session['session-id']}"
    )
    forged = {"Livepeer-Session-Id": "mine", "Livepeer-Runner-Route": "mine"}
    with proxy.http() as http:
        for path in ("/apps/hello/app", "/apps/hello/app/"):  # 24: both forms
            answer = http.get(path, headers=forged)
            assert answer.status_code == 200, answer.text
            assert answer.json()["path"] == "/"
            assert answer.json()["session"]["session-id"] != "mine"  # 21: overwritten
            assert answer.json()["session"]["runner-route"] == "hello"


def test_22_sse_streams_through_the_proxy_as_the_app_writes_it(stack):
    proxy, _, _ = stack
    payload = {"prompt": "one two three", "max_tokens": 6, "delay_ms": 300}
    report = sdk_apps("stream", proxy.url, "kubepeer/tokens", "/v1/stream", json.dumps(payload))
    assert report["status"] == 200
    assert report["content_type"] == "text/event-stream"
    lines = report["lines"]
    assert lines[-1]["line"] == "data: [DONE]"
    tokens = [json.loads(x["line"].removeprefix("data: "))["token"] for x in lines[:-1]]
    assert tokens == ["one", "two", "three", "one", "two", "three"]
    # 22: incremental. Five 300 ms gaps: the first event came at least 1 s before the last.
    assert lines[-1]["at"] - lines[0]["at"] >= 1.0


def test_11_24_a_single_shot_call_holds_a_slot_only_while_it_runs(stack):
    proxy, second, _ = stack
    slow = {"prompt": "slow", "max_tokens": 8, "delay_ms": 400}
    answers: list[int] = []
    started = threading.Event()

    def call() -> None:
        with proxy.http() as http, http.stream("POST", "/apps/tokens/app/v1/stream",
                                               json=slow) as answer:  # fmt: skip
            started.set()
            answer.read()
            answers.append(answer.status_code)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(30)
    with second.http() as http:  # 24, 11: the slot is held, seen by the other replica
        tokens = next(r for r in http.get("/discovery").json()[0]["runners"]
                      if r["app"] == "kubepeer/tokens")  # fmt: skip
        assert (tokens["capacity_used"], tokens["capacity_available"]) == (1, 0)
        full = http.post("/apps/tokens/app/v1/stream", json=slow)
        assert (full.status_code, full.text) == (503, "no capacity available for runner\n")
    caller.join(30)
    assert answers == [200]
    with second.http() as http:
        tokens = next(r for r in http.get("/discovery").json()[0]["runners"]
                      if r["app"] == "kubepeer/tokens")  # fmt: skip
        assert tokens["capacity_used"] == 0
        quick = {"prompt": "x", "max_tokens": 1, "delay_ms": 0}
        assert http.post("/apps/tokens/app/v1/stream", json=quick).status_code == 200


def test_11_22_25_26_30_a_persistent_session_through_the_sdk_echoes_channels_and_websockets(stack):
    proxy, second, _ = stack
    session = sdk_apps("reserve", proxy.url, "kubepeer/echo")  # 11
    sid = session["session_id"]
    assert session["control_url"] == f"{proxy.url}/apps/echo/session/{sid}"
    assert session["app_url"] == f"{session['control_url']}/app"
    app_path = session["app_url"].removeprefix(proxy.url)
    with second.http() as http:  # any replica serves any request of the session
        made = http.post(f"{app_path}/start", json={"mime_type": "video/mp2t"})
        assert made.status_code == 200, made.text
        channels = made.json()  # 25: the client's `url`s
        assert channels["in"] == f"{second.url}/ai/trickle/{sid}-in"  # (its public URL)
        assert http.post(f"{channels['in']}/0", content=b"segment zero").status_code == 200
        echoed = http.get(f"{channels['out']}/0")
        assert (echoed.status_code, echoed.content) == (200, b"segment zero")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    ws_url = "wss" + session["app_url"].removeprefix("https") + "/ws"
    with websocket(ws_url, ssl=tls, open_timeout=10) as socket:  # 22: WebSocket relayed
        socket.send("text frame")
        assert socket.recv(timeout=10) == "text frame"
        socket.send(b"\x00\x01binary")
        assert socket.recv(timeout=10) == b"\x00\x01binary"
    assert sdk_apps("stop", session["control_url"]) == {"released": True}
    with proxy.http() as http:  # released: app URL 404, channels closed, stop again 204
        assert http.get(f"{session['app_url']}/health").status_code == 404
        assert http.post(f"{session['control_url']}/stop").status_code == 204  # 30
        gone = http.get(f"{channels['out']}/1")
        assert gone.status_code == 404 or gone.headers.get("lp-trickle-closed")  # 26


def test_11_capacity_holds_across_proxy_replicas(stack):
    proxy, second, _ = stack
    sessions = [reserve(proxy), reserve(second)]  # two replicas, one session each
    with second.http() as http:
        full = http.post("/apps/echo/session", json={})
        assert (full.status_code, full.text) == (503, "no capacity available for runner\n")
    stop(second, sessions.pop())
    sessions.append(reserve(proxy))
    for session in sessions:
        stop(proxy, session)


def test_21_25_26_the_runners_callbacks_check_route_session_and_token(stack):
    proxy, second, _ = stack
    session = reserve(proxy, "spy")
    sid = session["session_id"]
    control = f"/runner/spy/session/{sid}"
    with second.http() as http:
        forged = {
            "Livepeer-Session-Token": "forged",
            "X-Forwarded-For": "10.0.0.1",
            "Authorization": "Bearer private-token",  # the proxy's credential, not the app's
            "Connection": "close, X-Drop-Me",
            "X-Drop-Me": "1",
            "X-Kept": "yes",
        }
        app_path = session["app_url"].removeprefix(proxy.url)  # through the other replica
        assert http.get(f"{app_path}/look?q=1", headers=forged).status_code == 200
        seen = Spy.seen[-1]
        token = seen["livepeer-session-token"]
        assert len(token) == 52  # 21: the session's own, over the one the client sent
        assert token != "forged"
        assert seen["livepeer-session-control"] == f"{second.url}{control}"
        assert seen["x-kept"] == "yes"  # end to end; hop-by-hop and X-Forwarded-* dropped
        assert not {"x-forwarded-for", "x-drop-me", "forwarded", "authorization"} & set(seen)
        good = {"Livepeer-Session-Token": token}
        one = {"channels": [{"name": "a/b"}]}
        first = http.post(f"{control}/channels", json=one, headers=good)
        assert first.status_code == 200, first.text
        [channel] = first.json()["channels"]
        assert channel == {"name": "a-b", "channel_name": f"{sid}-a-b",
                           "mime_type": "application/octet-stream",
                           "url": f"{second.url}/ai/trickle/{sid}-a-b",
                           "internal_url": f"{second.url}/ai/trickle/{sid}-a-b"}  # fmt: skip
        assert http.post(f"{control}/channels", json=one, headers=good).json() == first.json()
        refusals = [  # 25: 401, 404 (session, runner), 400s
            (http.post(f"{control}/channels", json=one, headers={"Livepeer-Session-Token": "x"}),
             401, "invalid authorization"),
            (http.post("/runner/spy/session/session_none/channels", json=one, headers=good),
             404, "runner session not found"),
            (http.post(f"/runner/nope/session/{sid}/channels", json=one, headers=good),
             404, "runner not found"),
            (http.post(f"{control}/channels", json={"channels": [{"name": f"c{i}"}
                                                                 for i in range(26)]},
                       headers=good), 400, "channels cannot contain more than 25 entries"),
            (http.post(f"{control}/channels", json={"channels": [{"name": "a b"}]},
                       headers=good), 400,
             "invalid channel name 'a b': letters, digits, '_' and '-' only"),
            (http.post(f"{control}/channels", json={}, headers=good), 400, "channels is required"),
            (http.request("DELETE", f"{control}/channels", json={"channels": ["zz"]},
                          headers=good), 404, "trickle channel not found"),
        ]  # fmt: skip
        for answer, status, text in refusals:
            assert (answer.status_code, answer.text.strip()) == (status, text)
        deleted = http.request("DELETE", f"{control}/channels", json={"channels": ["a/b"]},
                               headers=good)  # fmt: skip
        assert deleted.json() == {"deleted": ["a/b"]}  # 26
        assert http.get(f"{channel['url']}/0").status_code == 404
        # The runner ends the session itself (4.3): from then on its app URL is 404.
        wrong = {"Livepeer-Session-Token": "x"}
        assert http.post(f"{control}/stop", headers=wrong).status_code == 401
        assert http.post(f"{control}/stop", headers=good).status_code == 204
        assert http.get(f"{session['app_url']}/look").status_code == 404
        assert http.post(f"{control}/stop", headers=good).status_code == 404


def test_the_app_ends_its_own_session_through_the_sdk_path(stack):
    proxy, _, _ = stack
    session = reserve(proxy)
    with proxy.http() as http:  # echo's /done calls <Livepeer-Session-Control>/stop
        assert http.post(f"{session['app_url']}/done").json() == {"stop": 204}
        assert http.post(f"{session['app_url']}/start", json={}).status_code == 404


def test_12_23_30_the_wrong_kind_of_call_is_refused_as_go_livepeer_refuses_it(stack):
    proxy, _, urls = stack
    with proxy.http() as http:
        cases = [  # 12, 23
            (http.post("/apps/hello/session", json={}), 400,
             "only persistent runners have sessions"),
            (http.post("/apps/echo/app/x", json={}), 400, "runner is not single-shot"),
            (http.post("/apps/nope/session", json={}), 404, "runner not found"),
            (http.post("/apps/cold/session", json={}), 404, "runner not found"),
            (http.post("/apps/echo/session/session_none/app/x"), 404, "runner session not found"),
            (http.post("/apps/nope/session/s/stop"), 404, "runner not found"),
            (http.post("/apps/echo/session/session_none/stop"), 204, ""),
            (http.get("/apps/gone/app/x"), 502, "the app did not answer"),
        ]  # fmt: skip
        for answer, status, text in cases:
            assert (answer.status_code, answer.text.strip()) == (status, text)
            assert not any(url in answer.text for url in urls.values())


def test_27_generated_proxy_urls_reach_the_session_and_go_with_it(stack):
    proxy, _, _ = stack
    with proxy.http() as http:
        called = http.get("/run/hi/greet/me?x=1")  # a proxy: true single-shot's own URL
        assert called.status_code == 200, called.text
        assert called.json()["path"] == "/greet/me"
        session = reserve(proxy, "web")  # a proxy: true persistent app: app_url generated
        prefix = f"{proxy.url}/run/"
        assert session["app_url"].startswith(prefix)
        assert len(session["app_url"].removeprefix(prefix)) == 26
        assert http.get(f"{session['app_url']}/page?q=2").status_code == 200
        seen = Spy.seen[-1]
        assert seen["livepeer-session-id"] == session["session_id"]
        assert seen["livepeer-runner-route"] == "web"
        token = {"Livepeer-Session-Token": seen["livepeer-session-token"]}
        control = f"/runner/web/session/{session['session_id']}/proxy"
        made = http.post(control, json={}, headers=token)  # 27: {} is the default target
        assert made.status_code == 200, made.text
        assert made.json()["url"] == f"{prefix}{made.json()['proxy_id']}"
        assert http.get(f"{made.json()['url']}/other").status_code == 200
        foreign = http.post(control, json={"target_url": "http://10.9.9.9:80/"}, headers=token)
        assert (foreign.status_code, foreign.text) == (
            400, "target_url hostname must match registered runner_url hostname\n")  # fmt: skip
        assert http.post(control, content=b"{", headers=token).status_code == 400
        assert (
            http.post(control, json={}, headers={"Livepeer-Session-Token": "x"}).status_code == 401
        )
        stop(proxy, session)
        for url in (session["app_url"], made.json()["url"]):  # 27: gone with the session
            gone = http.get(f"{url}/page")
            assert (gone.status_code, gone.text) == (404, "live runner proxy not found\n")
        assert http.get("/run/nothing-here").status_code == 404


def test_29_a_replica_that_turns_unready_leaves_discovery_and_releases_its_sessions(stack):
    """go-livepeer's failing health check, as Kubernetes says it: the replica's EndpointSlice
    turns it unready. The app leaves discovery, its session is released; ready again, it is
    listed under the same route."""
    proxy, second, _ = stack

    def apps(server: ProxyServer) -> set[str]:
        with server.http() as http:
            return {r["app"] for r in http.get("/discovery").json()[0]["runners"]}

    session = reserve(proxy, "flaky")
    with proxy.http() as http:
        assert http.get(f"{session['app_url']}/x").status_code == 200
        for server in (proxy, second):
            server.set_endpoints({**ENDPOINTS, "live-flaky": []})
        try:
            flaky = "kubepeer/flaky"
            wait_for(lambda: flaky not in apps(proxy) and flaky not in apps(second),
                     timeout=15, what="the unready app to leave discovery")  # fmt: skip
            assert http.get(f"{session['app_url']}/x").status_code == 404
        finally:
            for server in (proxy, second):
                server.set_endpoints(ENDPOINTS)
        wait_for(lambda: "kubepeer/flaky" in apps(proxy), timeout=15, what="the app back")
        assert http.get(f"{session['app_url']}/x").status_code == 404  # released for good


def test_the_runner_image_serves_a_batch_pipeline_as_a_live_runner_app(
    stack, tiny_models, tmp_path
):
    """The bridge (DESIGN.md, "AIModels and LiveRunners"): the runner image, given a
    pipeline and a model, is a single-shot app called at /apps/<route>/app/<pipeline>."""
    proxy, second, _ = stack
    runner = start_runner({"PIPELINE": "text-to-image", "MODEL_ID": SD,
                           "MODEL_DIR": str(tiny_models)}, tmp_path / "runner.log")  # fmt: skip
    try:
        bridged = {**APPS, "apps": [*APPS["apps"], app_row("t2i", "text-to-image/tiny-sd",
                                                           "single-shot")]}  # fmt: skip
        for server in (proxy, second):
            server.set_apps(bridged)
            server.set_endpoints({**ENDPOINTS, "live-t2i": [runner.url]})
        with proxy.http() as http:
            wait_for(lambda: any(r["app"] == "text-to-image/tiny-sd"
                                 for r in http.get("/discovery").json()[0]["runners"]),
                     timeout=15, what="the bridged app in discovery")  # fmt: skip
        answer = sdk_apps("call", proxy.url, "text-to-image/tiny-sd", "/text-to-image",
                          json.dumps(T2I))  # fmt: skip
        [image] = answer["data"]["images"]
        assert image["url"].startswith("data:image/png;base64,")
    finally:
        for server in (proxy, second):
            server.set_apps(APPS)
            server.set_endpoints(ENDPOINTS)
        stop_runner(runner)


def test_an_abandoned_free_session_is_released_with_its_channels(stack, redis_server, tmp_path):
    """Kubepeer's bound on free sessions (go-livepeer keeps them until stopped): unused for
    --app-session-idle, a session is released by the sweep, its channels closed."""
    _, _, _ = stack
    args = ["--no-payments", "--offchain-gateways", "--app-session-idle", "2"]
    idle = start_proxy(tmp_path / "idle", redis_server, models=models_json(extra=[], base=False),
                       endpoints=ENDPOINTS, apps=APPS, recipient=None, namespace="idle",
                       args=args)  # fmt: skip
    try:
        session = reserve(idle)
        with idle.http() as http:
            made = http.post(f"{session['app_url']}/start", json={})
            assert made.status_code == 200, made.text
            out = made.json()["out"]
            assert http.get(f"{out}/next").status_code == 200  # the channel exists

            def echo_in_use() -> int:  # asked of discovery: a request to the app renews it
                runners = http.get("/discovery").json()[0]["runners"]
                return next(r for r in runners if r["app"] == "kubepeer/echo")["capacity_used"]

            assert echo_in_use() == 1
            wait_for(lambda: echo_in_use() == 0, timeout=10, what="the idle session released")
            assert http.get(f"{session['app_url']}/health").status_code == 404
            gone = http.get(f"{out}/0")
            assert gone.status_code == 404 or gone.headers.get("lp-trickle-closed")
    finally:
        stop_proxy(idle, grace=3)
