#!/usr/bin/env python3
"""live-video-to-video: what the whole path adds to the model's own time per frame.

For each model (noop, the tiny diffusion model; with --full-size an SD-Turbo-shaped UNet
and VAE with random weights instead of the tiny one, meant for a GPU), in the same run:

- in-process: the runner's own decoder, model and encoder called directly on the same
  segments, one after another: time per segment, and frames per second;
- the whole path: a runner process serving the stream over real HTTP trickle (the test
  oracle server, hack/kubepeer_dev/trickle_oracle.py), input segments published at a steady
  pace below the in-process rate: latency from an input segment fully published to its
  output segment fully readable, p50/p99 (with one-frame segments that is the latency of
  each frame); then the whole clip published at once: sustained output frames per second.

Ratios are path / in-process. A first stream warms the runner up, and the first segments of
each timed run are left out.

Run: .venv/bin/python hack/bench/live.py [--size 512] [--frames 48] [--full-size]
The runner's optimisation flags apply to both sides, e.g. TORCH_COMPILE=1 (CUDA only).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from kubepeer_dev import tiny_models
from kubepeer_dev.live_clips import clip_segments, decode_frames
from kubepeer_dev.trickle_oracle import OracleServer
from kubepeer_runner.config import RunnerSettings
from kubepeer_runner.live.media import SegmentDecoder, SegmentEncoder
from kubepeer_runner.live.models import LiveParams, load_model
from kubepeer_runner.serving import Device

REPO = Path(__file__).resolve().parents[2]

WARMUP_SEGMENTS = 3


def in_process(model: Any, segments: list[bytes], params: LiveParams) -> list[float]:
    """Seconds per segment for decode + model + encode, called directly."""
    decoder, times = SegmentDecoder(), []
    for segment in segments:
        started = time.perf_counter()
        frames = decoder.decode(segment, params.width, params.height)
        encoder = SegmentEncoder(params.width, params.height)
        for frame in frames:
            encoder.encode(model(frame.image, params), frame.pts)
        encoder.finish()
        times.append(time.perf_counter() - started)
    return times


class Runner:
    def __init__(self, model_id: str, model_dir: Path, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HOST": "127.0.0.1",
               "PORT": str(port), "PIPELINE": "live-video-to-video", "MODEL_ID": model_id,
               "MODEL_DIR": str(model_dir), "LIVE_INPUT_TIMEOUT_SECONDS": "5"}  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubepeer_runner"], env=env,
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health").json()["status"] == "IDLE":
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"runner did not become IDLE:\n{log.read_text()[-3000:]}")

    def stream(self, trickle: OracleServer, name: str, params: LiveParams) -> dict[str, str]:
        channels = {"in": name, "out": f"{name}-out", "events": f"{name}-events"}
        trickle.create(*channels.values())
        body = {"subscribe_url": trickle.url(channels["in"]),
                "publish_url": trickle.url(channels["out"]),
                "events_url": trickle.url(channels["events"]),
                "params": params.model_dump(), "gateway_request_id": name}  # fmt: skip
        httpx.post(f"{self.url}/live-video-to-video", json=body, timeout=30).raise_for_status()
        return channels

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def through_path(
    trickle: OracleServer, channels: dict[str, str], segments: list[bytes], pace: float | None
) -> tuple[dict[int, float], dict[int, tuple[float, int]]]:
    """Publish segments (every `pace` s, or all at once) while reading the output;
    returns when each input segment was published and when each output segment was read,
    with the frames it held."""
    published: dict[int, float] = {}
    readable: dict[int, tuple[float, int]] = {}  # seq -> (when, frames)

    def read() -> None:
        with httpx.Client(timeout=60) as client:
            for seq in range(len(segments)):
                try:
                    response = client.get(f"{trickle.url(channels['out'])}/{seq}")
                except httpx.HTTPError:
                    return
                if response.status_code != 200 or response.headers.get("Lp-Trickle-Closed"):
                    return
                readable[seq] = (time.perf_counter(), len(decode_frames(response.content)))

    reader = threading.Thread(target=read)
    reader.start()
    started = time.perf_counter()
    for seq, segment in enumerate(segments):
        if pace is not None:
            time.sleep(max(0.0, started + seq * pace - time.perf_counter()))
        trickle.publish(channels["in"], seq, segment)
        published[seq] = time.perf_counter()
    reader.join(timeout=600)
    trickle.close(channels["in"])
    return published, readable


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench(model_id: str, model_dir: Path, args: argparse.Namespace, trickle: OracleServer,
          tmp: Path) -> None:  # fmt: skip
    params = LiveParams(width=args.size, height=args.size)
    fps = args.fps
    # Latency: one segment per `--segment-frames` frames (1: every frame its own segment).
    small = clip_segments(args.frames, fps, args.size, args.size, args.segment_frames / fps)
    # Throughput: the whole clip in 1 s segments, as a gateway cuts it.
    large = clip_segments(args.frames, fps, args.size, args.size, 1.0)

    model = load_model(model_id, model_dir, Device.pick(), RunnerSettings.read().flags)
    in_process(model, small[:WARMUP_SEGMENTS], params)
    local = in_process(model, small, params)[WARMUP_SEGMENTS:]
    local_fps = args.frames / sum(in_process(model, large, params))
    del model

    log = tmp / f"runner-{model_id.replace('/', '_')}.log"
    runner = Runner(model_id, model_dir, log)
    try:
        # Paced below what the path sustains, so latency is the path's, not a queue's.
        pace = args.pace_ms / 1000 if args.pace_ms else None
        pace = pace or max(args.segment_frames / fps, 2 * statistics.median(local))
        # A stream to warm the runner (first calls, allocations) whose backlog would
        # otherwise sit in front of every timed segment; then the timed stream.
        channels = runner.stream(trickle, f"warm{abs(hash(model_id))}", params)
        through_path(trickle, channels, small[:WARMUP_SEGMENTS], 1.0)
        channels = runner.stream(trickle, f"lat{abs(hash(model_id))}", params)
        published, readable = through_path(trickle, channels, small, pace)
        path = [readable[s][0] - published[s] for s in readable if s >= WARMUP_SEGMENTS]
        channels = runner.stream(trickle, f"fps{abs(hash(model_id))}", params)
        published, readable = through_path(trickle, channels, large, None)
    finally:
        runner.stop()
    if not path or not readable:
        tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-25:])
        print(f"{model_id}: no output came back; the runner's log ends:\n    {tail}")
        return
    frames_out = sum(frames for _, frames in readable.values())
    path_fps = frames_out / (max(t for t, _ in readable.values()) - min(published.values()))
    lp50, lp99 = percentile(local, 0.5), percentile(local, 0.99)
    pp50, pp99 = percentile(path, 0.5), percentile(path, 0.99)
    print(f"\n{model_id} at {args.size}x{args.size}, {args.segment_frames} frame(s) per "
          f"segment, paced every {pace * 1000:.0f} ms, {len(path)} segments timed")  # fmt: skip
    print(f"  latency in-process p50 {lp50 * 1000:7.1f} ms  p99 {lp99 * 1000:7.1f} ms")
    print(f"  latency whole path p50 {pp50 * 1000:7.1f} ms  p99 {pp99 * 1000:7.1f} ms   "
          f"ratio p50 {pp50 / lp50:.2f}  p99 {pp99 / lp99:.2f}   "
          f"added p50 {(pp50 - lp50) * 1000:.1f} ms")  # fmt: skip
    print(
        f"  throughput in-process {local_fps:6.1f} fps   whole path {path_fps:6.1f} fps   "
        f"ratio {path_fps / local_fps:.2f}   ({frames_out} of {args.frames} frames out)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--segment-frames", type=int, default=1)
    parser.add_argument(
        "--pace-ms",
        type=float,
        help="latency run: publish every N ms "
        "(default: twice the in-process time of a segment, at least 1/fps)",
    )
    parser.add_argument("--models", default=f"noop,{tiny_models.LIVE_TINY_MODEL}")
    full = tiny_models.LIVE_FULL_MODEL
    parser.add_argument("--full-size", action="store_true", help=f"add {full} (for a GPU)")
    parser.add_argument("--model-dir", type=Path, help="default: a temporary directory")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    models += [tiny_models.LIVE_FULL_MODEL] if args.full_size else []
    device = Device.pick()
    flags = ",".join(sorted(RunnerSettings.read().flags)) or "none"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"device {device.name} ({device.dtype}); torch threads from OMP_NUM_THREADS="
          f"{threads}; flags {flags} (runner and in-process)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model_dir or tmp / "models"
        for model_id in models:
            tiny_models.build_model(model_dir, model_id)
        trickle = OracleServer(tmp / "trickle.log")
        try:
            for model_id in models:
                bench(model_id, model_dir, args, trickle, tmp)
        finally:
            trickle.stop()


if __name__ == "__main__":
    main()
