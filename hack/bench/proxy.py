#!/usr/bin/env python3
"""Proxy overhead, as ratios against baselines measured in the same run.

1. Added latency on a trivial fast route at a fixed request rate: the same POST
   /text-to-image straight to a runner stand-in (an aiohttp server that answers at once,
   so only the proxy's own cost shows) and through `kubepeer proxy` (payments off; TLS
   as gateways use it, and plaintext for a like-for-like hop).
2. Throughput at a fixed concurrency, the same three ways.
3. GetOrchestrator with a fresh TLS connection per call, as go-livepeer dials, against a
   fresh-connection GET /healthz on the same port (what the handshake alone costs).

Run: .venv/bin/python hack/bench/proxy.py [--rate 200] [--seconds 5] [--calls 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "operator")]

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import httpx  # noqa: E402
from eth_account import Account  # noqa: E402
from eth_account.messages import encode_defunct  # noqa: E402
from eth_utils import keccak  # noqa: E402

from kubepeer.livepeer import net_pb2  # noqa: E402

MODEL = "kubepeer-bench/fast"
BODY = {"prompt": "x", "height": 8, "width": 8, "model_id": MODEL}
STAND_IN = """
import sys
from aiohttp import web
REPLY = {"images": [{"url": "data:image/png;base64,iVBORw0KGgo=", "seed": 1, "nsfw": False}]}
async def t2i(request):
    await request.read()
    return web.json_response(REPLY)
app = web.Application()
app.router.add_post("/text-to-image", t2i)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, verify=False, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def at_rate(
    url: str, rate: float, seconds: float, headers: dict[str, str], failures: list[int]
) -> list[float]:
    """Open loop: one request every 1/rate s, latencies in seconds; non-200s in `failures`."""
    connector = aiohttp.TCPConnector(limit=0, ssl=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> float:
            start = time.perf_counter()
            async with session.post(url, json=BODY, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    failures.append(response.status)
            return time.perf_counter() - start

        for _ in range(20):  # warm the connection pool
            await one()
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, concurrency: int, seconds: float, headers: dict[str, str]) -> float:
    connector = aiohttp.TCPConnector(limit=0, ssl=False)
    done = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with session.post(url, json=BODY, headers=headers) as response:
                    await response.read()
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
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
            channel.unary_unary(
                "/net.Orchestrator/GetOrchestrator",
                request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
                response_deserializer=net_pb2.OrchestratorInfo.FromString,
            )(request, timeout=10)
        grpc_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with httpx.Client(verify=False, http2=True) as client:
            client.get(f"https://127.0.0.1:{port}/healthz")
        https_times.append(time.perf_counter() - start)
    return grpc_times, https_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--calls", type=int, default=100, help="GetOrchestrator calls")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kubepeer-bench-proxy-"))
    processes: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
    env.pop("KUBECONFIG", None)

    def spawn(*command: str) -> None:
        log = (work / f"{len(processes)}.log").open("wb")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        redis_port, runner_port = free_port(), free_port()
        spawn("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "")
        spawn(sys.executable, "-c", STAND_IN, str(runner_port))
        runner = f"http://127.0.0.1:{runner_port}"
        models = {"version": 1, "models": [{
            "aimodel": "fast", "pipeline": "text-to-image", "modelId": MODEL, "capability": 27,
            "runner": "runner-fast", "port": runner_port, "capacity": 1000, "warm": "Always",
            "maxReplicas": 1, "price": {"weiPerUnit": "1", "gateways": {}, "surge": None},
        }]}  # fmt: skip
        (work / "models.json").write_text(json.dumps(models))
        (work / "endpoints.json").write_text(json.dumps({"runner-fast": [runner]}))
        (work / "bearer").write_text("bench")
        ports = {"tls": free_port(), "plain": free_port()}
        for mode, port in ports.items():
            spawn(
                sys.executable, "-m", "kubepeer.cli", "proxy", "--bind", f"127.0.0.1:{port}",
                "--public-url", f"{'https' if mode == 'tls' else 'http'}://127.0.0.1:{port}",
                "--namespace", "bench", "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
                "--models-file", str(work / "models.json"),
                "--endpoints-file", str(work / "endpoints.json"), "--no-wake",
                "--no-payments", "--bearer-token-file", str(work / "bearer"),
                *(["--plaintext"] if mode == "plain" else []),
            )  # fmt: skip
        wait_up(f"{runner}/")
        wait_up(f"https://127.0.0.1:{ports['tls']}/healthz")
        wait_up(f"http://127.0.0.1:{ports['plain']}/healthz")
        time.sleep(1.5)  # the endpoint file is read within a second of start
        auth = {"Authorization": "Bearer bench"}
        targets = {
            "direct to the runner": (f"{runner}/text-to-image", {}),
            "through the proxy (plaintext)": (
                f"http://127.0.0.1:{ports['plain']}/text-to-image", auth),
            "through the proxy (TLS)": (f"https://127.0.0.1:{ports['tls']}/text-to-image", auth),
        }  # fmt: skip

        print(f"\n1. latency at {args.rate:.0f} requests/s for {args.seconds:.0f} s (ms)")
        base = None
        for name, (url, headers) in targets.items():
            failures: list[int] = []
            samples = asyncio.run(at_rate(url, args.rate, args.seconds, headers, failures))
            p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
            if failures:
                name += f" [{len(failures)} of {len(samples)} failed]"
            if base is None:
                base = (p50, p99)
                print(f"   {name:32s} p50 {p50:6.2f}  p99 {p99:6.2f}")
            else:
                print(f"   {name:32s} p50 {p50:6.2f}  p99 {p99:6.2f}   added: "
                      f"p50 +{p50 - base[0]:.2f}  p99 +{p99 - base[1]:.2f}  "
                      f"(x{p50 / base[0]:.1f} / x{p99 / base[1]:.1f})")  # fmt: skip

        print(f"\n2. throughput, {args.concurrency} concurrent, {args.seconds:.0f} s (requests/s)")
        direct = None
        for name, (url, headers) in targets.items():
            rate = asyncio.run(closed_loop(url, args.concurrency, args.seconds, headers))
            direct = direct or rate
            print(f"   {name:32s} {rate:8.0f}   ({rate / direct:.2f} of direct)")

        print(f"\n3. GetOrchestrator, a fresh TLS connection per call, {args.calls} calls (ms)")
        grpc_times, https_times = fresh_tls_calls(ports["tls"], args.calls)
        for name, samples in [("GET /healthz (HTTP/2, fresh TLS)", https_times),
                              ("GetOrchestrator (gRPC, fresh TLS)", grpc_times)]:  # fmt: skip
            print(f"   {name:36s} p50 {percentile(samples, 0.5) * 1e3:6.2f}  "
                  f"p99 {percentile(samples, 0.99) * 1e3:6.2f}")  # fmt: skip
        extra = statistics.median(grpc_times) - statistics.median(https_times)
        print(f"   GetOrchestrator beyond a fresh-connection GET: p50 {extra * 1e3:+.2f} ms")
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
