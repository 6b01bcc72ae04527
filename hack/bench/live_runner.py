#!/usr/bin/env python3
"""Live Runner apps through the proxy, as ratios against baselines measured in the same run.

1. Reserve to first proxied byte: `POST /apps/echo/session` and then `GET <app_url>/health`
   through `kubepeer proxy` (payments off, offchain clients admitted, plaintext), against
   the same GET straight to the app; both on kept-alive connections, interleaved. Printed:
   p50 and p99 of each, and the p50 the proxy adds (both requests and the session's Redis
   script included).
2. WebSocket echo round trip: one message out and back on a session's `/ws` through the
   proxy, against the same on the app directly; interleaved. Printed: p50s and the p50
   added.
3. Metering: the paying proxy's CPU (its own process, from /proc) over --meter-seconds
   with 0 sessions and with each count of --sessions paid, metered sessions open
   (--live-payment-interval 1); printed as CPU per session per tick in microseconds, and
   the largest count's over the smallest's (flat is 1.0).

The app is `kubepeer-app echo` (the runner package's example). The chain view and the
payer's funds are stood in for, as in hack/bench/proxy.py section 5.

Run: .venv/bin/python hack/bench/live_runner.py [--iterations 300] [--meter-seconds 10]
     [--sessions 10,100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64decode
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from websockets.sync.client import connect

from kubepeer.livepeer import net_pb2
from kubepeer.payments.senders import SenderWatch
from kubepeer_dev.bench import (
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

PER_SECOND = 4_000_000_000  # wei per second of a metered session: half a ticket's EV
EV = 8_000_000_000


def app_row(price: dict[str, str] | None) -> dict[str, Any]:
    return {"route": "echo", "app": "bench/echo", "mode": "persistent", "runner": "live-echo",
            "port": 8080, "capacity": 10_000, "warm": "Always", "maxReplicas": 1,
            "proxy": False, "metadata": None, "version": None, "price": price}  # fmt: skip


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def reserve_to_first_byte(proxy: str, app: str, iterations: int) -> None:
    through, direct = [], []
    with httpx.Client(base_url=proxy) as via, httpx.Client(base_url=app) as straight:
        straight.get("/health")
        for _ in range(iterations):
            start = time.perf_counter()
            session = via.post("/apps/echo/session", json={}).json()
            with via.stream("GET", f"{session['app_url']}/health") as answer:
                next(answer.iter_raw())
            through.append(time.perf_counter() - start)
            via.post(f"{session['control_url']}/stop")
            start = time.perf_counter()
            with straight.stream("GET", "/health") as answer:
                next(answer.iter_raw())
            direct.append(time.perf_counter() - start)
    added = statistics.median(through) - statistics.median(direct)
    print(f"1. reserve to first byte: proxy p50 {ms(statistics.median(through))} "
          f"p99 {ms(percentile(through, 0.99))}; direct p50 {ms(statistics.median(direct))} "
          f"p99 {ms(percentile(direct, 0.99))}; added p50 {ms(added)} "
          "(target <= 5 ms)")  # fmt: skip


def websocket_round_trip(proxy: str, app: str, iterations: int) -> None:
    with httpx.Client(base_url=proxy) as via:
        session = via.post("/apps/echo/session", json={}).json()
    through_url = "ws" + session["app_url"].removeprefix("http") + "/ws"
    times: dict[str, list[float]] = {"proxy": [], "direct": []}
    with (
        connect(through_url) as through,
        connect("ws" + app.removeprefix("http") + "/ws") as direct,
    ):
        for _ in range(iterations):
            for name, socket in (("proxy", through), ("direct", direct)):
                start = time.perf_counter()
                socket.send("ping")
                socket.recv()
                times[name].append(time.perf_counter() - start)
    with httpx.Client(base_url=proxy) as via:
        via.post(f"{session['control_url']}/stop")
    p50 = {name: statistics.median(values) for name, values in times.items()}
    print(f"2. WebSocket echo: proxy p50 {ms(p50['proxy'])}; direct p50 {ms(p50['direct'])}; "
          f"added p50 {ms(p50['proxy'] - p50['direct'])} (target <= 1 ms)")  # fmt: skip


def paid_sessions(paying: str, count: int, seconds: float) -> list[str]:
    """`count` metered sessions, each paid for `seconds` and more."""
    gateway = Gateway()
    tickets = int(seconds * PER_SECOND / EV) + 4
    controls = []
    with httpx.Client(base_url=paying, timeout=30) as http:
        for _ in range(count):
            payer = {"Livepeer-Payer-Address": gateway.account.address}
            asked = http.post("/apps/echo/session", json={}, headers=payer)
            body = asked.json()
            info = net_pb2.OrchestratorInfo.FromString(b64decode(body["payment_params"]))
            headers = gateway.headers(info, None, "", tickets=tickets,
                                      manifest=body["manifest_id"])  # fmt: skip
            del headers["Authorization"]
            opened = http.post("/apps/echo/session", json={}, headers=headers)
            if opened.status_code != 200:
                raise RuntimeError(f"a paid session was refused: {opened.text}")
            controls.append(opened.json()["control_url"])
    return controls


def metering(paying: str, pid: int, counts: list[int], seconds: float) -> None:
    cpu: dict[int, float] = {}
    for count in [0, *counts]:
        controls = paid_sessions(paying, count, seconds + 5)
        time.sleep(1.5)  # every session past its first debit
        start = cpu_seconds(pid)
        time.sleep(seconds)
        cpu[count] = cpu_seconds(pid) - start
        with httpx.Client(timeout=30) as http:
            for control in controls:
                http.post(f"{control}/stop")
    ticks = seconds  # one debit per session per second (--live-payment-interval 1)
    per = {n: (cpu[n] - cpu[0]) / (n * ticks) * 1e6 for n in counts}
    rows = ", ".join(f"{n} sessions: {us:.0f} us" for n, us in per.items())
    print(f"3. metering CPU per session per tick: {rows}; idle proxy {cpu[0] / seconds * 1e3:.1f} "
          f"ms/s; {max(counts)} over {min(counts)}: {per[max(counts)] / per[min(counts)]:.2f} "
          "(flat: 1.0)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--meter-seconds", type=float, default=10.0)
    parser.add_argument("--sessions", default="10,100")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubepeer-bench-live-runner-"))
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    processes: list[subprocess.Popen[bytes]] = []
    stopped = threading.Event()  # the sender watch's, before Redis goes

    def spawn(*command: str) -> subprocess.Popen[bytes]:
        log = (work / f"{len(processes)}.log").open("wb")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        return processes[-1]

    try:
        redis_port, app_port = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        spawn("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "")
        wait_up_port(redis_port)
        spawn(sys.executable, "-m", "kubepeer_runner.apps", "echo", "--host", "127.0.0.1",
              "--port", str(app_port))  # fmt: skip
        app = f"http://127.0.0.1:{app_port}"
        wait_up(f"{app}/health")
        keep_view_fresh(redis_url)
        SenderWatch(Redis.from_url(redis_url), lambda _: FUNDED, stop=stopped).start()
        (work / "endpoints.json").write_text(json.dumps({"live-echo": [app]}))
        (work / "models.json").write_text(json.dumps({"version": 1, "models": []}))
        (work / "bearer").write_text("bench")
        (work / "recipient-secret").write_bytes(os.urandom(32))
        (work / "auth-secret").write_bytes(os.urandom(32))
        urls = {}
        for name, price, extra in [
            ("free", None, ["--no-payments", "--bearer-token-file", str(work / "bearer"),
                            "--offchain-gateways"]),
            ("paying", {"wei": str(PER_SECOND), "unit": "seconds"},
             ["--recipient", "0x" + "5a" * 20, "--live-payment-interval", "1"]),
        ]:  # fmt: skip
            table = {"version": 1, "apps": [app_row(price)]}
            (work / f"apps-{name}.json").write_text(json.dumps(table))
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            proxy = spawn(
                sys.executable, "-m", "kubepeer.cli", "proxy", "--bind", f"127.0.0.1:{port}",
                "--public-url", urls[name], "--namespace", "bench", "--redis-url", redis_url,
                "--plaintext", "--models-file", str(work / "models.json"),
                "--endpoints-file", str(work / "endpoints.json"),
                "--apps-file", str(work / f"apps-{name}.json"), "--no-wake",
                "--recipient-secret-file", str(work / "recipient-secret"),
                "--auth-secret-file", str(work / "auth-secret"), *extra,
            )  # fmt: skip
            wait_up(f"{urls[name]}/readyz")
            if name == "paying":
                paying_pid = proxy.pid
        reserve_to_first_byte(urls["free"], app, args.iterations)
        websocket_round_trip(urls["free"], app, args.iterations)
        counts = [int(n) for n in args.sessions.split(",")]
        metering(urls["paying"], paying_pid, counts, args.meter_seconds)
    finally:
        stopped.set()
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
