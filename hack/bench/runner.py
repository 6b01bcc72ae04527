#!/usr/bin/env python3
"""Runner overhead: text-to-image through HTTP against the same pipeline called in-process.

Both sides load the same tiny model (hack/tiny_models.py) and run the same request; the
difference is what the HTTP API, JSON, the guard and the device queue cost. Then requests
per second over HTTP at concurrency 1, 4 and 16 (against the in-process rate), and the
runner's peak memory while it refuses a 100 MB upload (against its memory before). On a
CUDA machine the same script times the GPU (it picks the device the runner would).

Run: .venv/bin/python hack/bench/runner.py [--requests 20] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import asyncio
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

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "runner"), str(REPO / "hack")]

import httpx  # noqa: E402

import tiny_models  # noqa: E402
from kubepeer_runner.config import ModelSpec  # noqa: E402
from kubepeer_runner.pipelines import text_to_image  # noqa: E402
from kubepeer_runner.serving import Device  # noqa: E402

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


def device_seconds(client: httpx.Client) -> tuple[float, float]:
    """(seconds requests held the device, requests) so far, from the runner's metrics."""
    text = client.get("/metrics").text
    value = {name: float(re.search(rf"^runner_inference_seconds_{name} (\S+)$", text, re.M)[1])
             for name in ("sum", "count")}  # fmt: skip
    return value["sum"], value["count"]


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
        env = {**os.environ, "PYTHONPATH": str(REPO / "runner"), "MODELS": models,
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
                held_before = device_seconds(client)
                direct, http = [], []
                for _ in range(args.requests):  # interleaved, so drift hits both alike
                    direct += timed_once(in_process)
                    http += timed_once(over_http)
                held_after = device_seconds(client)
            rates = {c: rate(url, body, c, args.requests) for c in (1, 4, 16)}
            before = memory_kib(server.pid, "VmRSS")
            status = refuse_upload(url, 100 * MIB)
            peak = memory_kib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(timeout=30)

    d, h = statistics.median(direct), statistics.median(http)
    held = (held_after[0] - held_before[0]) / (held_after[1] - held_before[1])
    print(f"device {device.name}: text-to-image {args.size}x{args.size}, {args.steps} steps, "
          f"{args.requests} requests")  # fmt: skip
    print(f"in-process {d * 1000:.1f} ms, over HTTP {h * 1000:.1f} ms (median, interleaved); "
          f"ratio HTTP/in-process {h / d:.2f}")  # fmt: skip
    print(f"HTTP overhead per request: {(statistics.mean(http) - held) * 1000:.1f} ms "
          f"(mean HTTP latency minus the mean time the same requests held the device, "
          f"{held * 1000:.1f} ms; ratio {statistics.mean(http) / held:.3f})")  # fmt: skip
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
