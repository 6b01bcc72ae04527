#!/usr/bin/env python3
"""Runner overhead: text-to-image through HTTP against the same pipeline called in-process.

Both sides load the same tiny model (hack/tiny_models.py) and run the same request; the
difference is what the HTTP API, JSON, PNG encoding and the device queue cost. On a CUDA
machine the same script times the GPU (it picks the device the runner would).

Run: .venv/bin/python hack/bench/runner.py [--requests 20] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, count: int) -> list[float]:  # noqa: ANN001
    fn()  # warm-up, not counted
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


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
        tiny_models.build(model_dir, ["text-to-image"])
        device = Device.pick()
        model = text_to_image.load(ModelSpec("text-to-image", MODEL_ID), model_dir, device)
        request = text_to_image.TextToImageRequest(**body)
        direct = timed(lambda: text_to_image.generate(model, request), args.requests)

        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "runner"), "PIPELINE": "text-to-image",
               "MODEL_ID": MODEL_ID, "MODEL_DIR": tmp, "HOST": "127.0.0.1",
               "PORT": str(port)}  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "kubepeer_runner"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if client.get("/health").json()["status"] == "OK":
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)

                def over_http() -> None:
                    client.post("/text-to-image", json=body).raise_for_status()

                http = timed(over_http, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)

    d, h = statistics.median(direct), statistics.median(http)
    print(f"device {device.name}: text-to-image {args.size}x{args.size}, {args.steps} steps, "
          f"{args.requests} requests")  # fmt: skip
    print(f"in-process {d * 1000:.1f} ms, over HTTP {h * 1000:.1f} ms (median); "
          f"ratio HTTP/in-process {h / d:.2f}, overhead {(h - d) * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
