#!/usr/bin/env python3
"""Runner overhead: text-to-image through HTTP against the same pipeline called in-process.

Both sides load the same tiny model (hack/kubepeer_dev/tiny_models.py) and run the same request; the
difference is what the HTTP API, JSON, the guard and the device queue cost. The overhead is
paired per request: each request's latency minus the time that same request held the device
(the runner's `runner_inference_seconds`, read after each one), sent by a keep-alive
`http.client` connection, as light a client as a gateway's Go one; its median is the figure
(on a shared machine a few requests wait for a core, which the mean shows). Then requests
per second over HTTP at concurrency 1, 4 and 16 (against the in-process rate), and the
runner's peak memory while it refuses a 100 MB upload (the peak reset just before it,
against its memory before). On a CUDA machine the same script times the GPU (it picks the
device the runner would).

Run: .venv/bin/python hack/bench/runner.py [--requests 20] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What `python -m kubepeer_runner` sets before torch loads: the in-process side runs alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx

from kubepeer_dev import tiny_models
from kubepeer_runner.config import ModelSpec
from kubepeer_runner.pipelines import text_to_image
from kubepeer_runner.serving import Device

REPO = Path(__file__).resolve().parents[2]

MODEL_ID = tiny_models.MODEL_IDS["text-to-image"]
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate(url: str, body: dict, concurrency: int, count: int) -> float:
    """Requests per second with `concurrency` clients each sending its share in turn."""

    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:

            async def worker(n: int) -> None:
                for _ in range(n):
                    (await client.post("/text-to-image", json=body)).raise_for_status()

            share = max(1, count // concurrency)
            started = time.perf_counter()
            await asyncio.gather(*(worker(share) for _ in range(concurrency)))
            return share * concurrency / (time.perf_counter() - started)

    return asyncio.run(run())


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def refuse_upload(url: str, size: int) -> int:
    async def run() -> int:
        async def body():  # noqa: ANN202 - streamed, as a client without Content-Length
            yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n")  # fmt: skip
            for _ in range(size // MIB):
                yield b"\0" * MIB
            yield b"\r\n--x--\r\n"

        headers = {"content-type": "multipart/form-data; boundary=x"}
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            response = await client.post("/image-to-image", content=body(), headers=headers)
            return response.status_code

    return asyncio.run(run())


def held_and_served(client: httpx.Client) -> tuple[float, float]:
    """(seconds requests held the device, seconds text-to-image requests spent in the
    runner's ASGI app) so far, from the runner's metrics."""
    text = client.get("/metrics").text

    def total(pattern: str) -> float:
        return float(re.search(rf"^{pattern} (\S+)$", text, re.M)[1])

    return (
        total("runner_inference_seconds_sum"),
        total(r'runner_request_seconds_sum\{route="/text-to-image"\}'),
    )


def paired_overheads(port: int, client: httpx.Client, body: dict) -> tuple[float, float, float]:
    """One request over a keep-alive connection: (its latency minus the time it held the
    device, the part of that spent inside the runner's app, device seconds)."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    payload, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    try:
        held_before, served_before = held_and_served(client)
        started = time.perf_counter()
        connection.request("POST", "/text-to-image", payload, headers)
        response = connection.getresponse()
        response.read()
        latency = time.perf_counter() - started
        if response.status != 200:
            raise SystemExit(f"text-to-image answered {response.status}")
        held_after, served_after = held_and_served(client)
    finally:
        connection.close()
    held = held_after - held_before
    return latency - held, served_after - served_before - held, held


def wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.get("/health").json()["status"] == "OK":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the runner did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    body = {"prompt": "a cat", "height": args.size, "width": args.size,
            "num_inference_steps": args.steps, "seed": 1}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        tiny_models.build(model_dir, ["text-to-image", "image-to-image"])
        device = Device.pick()
        model = text_to_image.load(ModelSpec("text-to-image", MODEL_ID), model_dir, device)
        request = text_to_image.TextToImageParams(**body)

        port = free_port()
        # image-to-image too: the route the 100 MB upload is sent to.
        models = json.dumps([{"pipeline": p, "model_id": MODEL_ID}
                             for p in ("text-to-image", "image-to-image")])  # fmt: skip
        env = {**os.environ, "MODELS": models,
               "MODEL_DIR": tmp, "HOST": "127.0.0.1", "PORT": str(port)}  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "kubepeer_runner"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
                wait_ready(client)

                def in_process() -> None:
                    text_to_image.generate(model, request)

                def over_http() -> None:
                    client.post("/text-to-image", json=body).raise_for_status()

                in_process(), over_http()  # warm-up, not counted
                direct, http, paired = [], [], []
                for _ in range(args.requests):  # interleaved, so drift hits both alike
                    direct += timed_once(in_process)
                    http += timed_once(over_http)
                    paired.append(paired_overheads(port, client, body))
            rates = {c: rate(url, body, c, args.requests) for c in (1, 4, 16)}
            before = memory_kib(server.pid, "VmRSS")
            # Reset the peak RSS to now, so the peak below is the refusal's alone.
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            status = refuse_upload(url, 100 * MIB)
            peak = memory_kib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(timeout=30)

    d, h = statistics.median(direct), statistics.median(http)
    overhead, inside, held = (statistics.median(column) for column in zip(*paired, strict=True))
    mean_overhead = statistics.mean(p[0] for p in paired)
    print(f"device {device.name}: text-to-image {args.size}x{args.size}, {args.steps} steps, "
          f"{args.requests} requests")  # fmt: skip
    print(f"in-process {d * 1000:.1f} ms, over HTTP {h * 1000:.1f} ms (median, interleaved); "
          f"ratio HTTP/in-process {h / d:.2f}")  # fmt: skip
    print(f"HTTP overhead per request: {overhead * 1000:.2f} ms median (target <= 3 ms; "
          f"mean {mean_overhead * 1000:.2f} ms): latency minus the time the same request held "
          f"the device (median {held * 1000:.1f} ms; ratio {(held + overhead) / held:.4f}); "
          f"inside the runner's app {inside * 1000:.2f} ms, the rest client, "
          f"socket and HTTP parsing")  # fmt: skip
    for c, r in rates.items():
        print(
            f"concurrency {c:2d}: {r:6.1f} req/s over HTTP; "
            f"ratio to in-process {r * d:.2f} (in-process {1 / d:.1f} req/s, one at a time)"
        )
    print(f"100 MB upload refused with {status}: runner RSS {before / 1024:.0f} MiB before, "
          f"peak {peak / 1024:.0f} MiB (+{(peak - before) / 1024:.1f} MiB; "
          f"ratio peak/before {peak / before:.3f})")  # fmt: skip


def timed_once(fn) -> list[float]:  # noqa: ANN001
    started = time.perf_counter()
    fn()
    return [time.perf_counter() - started]


if __name__ == "__main__":
    main()
