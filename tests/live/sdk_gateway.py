"""A gateway app made with the official Livepeer gateway SDK (`livepeer-gateway`), as apps use
it: start_lv2v against one orchestrator, publish H.264 through the SDK's MediaPublish, read
the transformed frames with media_output, send params on the control channel, read the
events channel, stop. Run by tests/live/test_live_sdk.py with the SDK's own interpreter
(.gateway-sdk, made by hack/setup); prints one JSON report on stdout.

    .gateway-sdk/bin/python tests/live/sdk_gateway.py ORCH_URL MODEL_ID --seconds 6 \
        --params '{"width": 384, "height": 384}' --update '{"prompt": "..."}'

So that every frame counts, nothing here drops one: each frame is written only once the
SDK's encoder queue is empty (its overflow and time-debt skips then never fire: their
counts are reported). The first `total` frames are those written before the `--update`
control message, sent once at least `--seconds` of frames are in and some output has come
back (so frames made before it exist, however slow the model). Then the app goes on
feeding tail frames until the output shows one, which proves every one of the first
`total` that went in has come out (a stream's output is in order): no guessed drain time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from fractions import Fraction

import av
import numpy as np
from livepeer_gateway import (
    ChannelReader,
    LivepeerGatewayError,
    MediaPublishConfig,
    StartJobRequest,
    VideoOutputConfig,
    start_lv2v,
)

FPS = 24  # default input rate (--fps)
WIDTH, HEIGHT = 320, 240


def input_frame(index: int) -> np.ndarray:
    """A moving diagonal gradient: every frame differs, and it is easy to compare."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = (x + y + index * 4) % 256
    return np.stack([base, (base * 2) % 256, 255 - base], axis=-1).astype(np.uint8)


def resized_input(index: int, width: int, height: int) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(input_frame(index), format="rgb24")
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


async def run(args: argparse.Namespace) -> dict:
    report: dict = {"events": [], "frames": [], "errors": []}
    started = time.monotonic()
    try:
        job = start_lv2v(
            args.orch_url,
            StartJobRequest(model_id=args.model, params=json.loads(args.params),
                            request_id="sdk-test", stream_id="sdk-stream"),
        )  # fmt: skip
    except LivepeerGatewayError as exc:
        report["start_error"] = str(exc)
        return report
    report["start_seconds"] = time.monotonic() - started
    report["manifest_id"] = job.manifest_id
    report["urls"] = [job.publish_url, job.subscribe_url, job.control_url, job.events_url]
    done = asyncio.Event()
    minimum = int(args.seconds * args.fps)
    span: dict[str, int] = {}  # "total": frames written before the update
    past_total = asyncio.Event()  # an output frame from the tail: the first `total` are out
    update_at: list[float] = []

    async def read_events() -> None:
        try:
            async for event in ChannelReader(job.events_url)(start_seq=0):
                report["events"].append(event)
                if done.is_set():
                    return
        except Exception as exc:  # the channel closing ends the reader
            report["errors"].append(f"events: {exc!r}")

    async def read_frames() -> None:
        output = job.media_output(start_seq=0)
        try:
            async for decoded in output.frames():
                if decoded.kind != "video":
                    continue
                pixels = decoded.frame.to_ndarray(format="rgb24").astype(np.int16)
                height, width = pixels.shape[:2]
                # The input frame this output shows (24 fps in, timestamps kept).
                index = round((decoded.pts_time or 0.0) * args.fps)
                source = resized_input(index, width, height).astype(np.int16)
                report["frames"].append({
                    "width": width, "height": height, "index": index,
                    "mean": float(pixels.mean()),
                    "diff_from_input": float(np.abs(pixels - source).mean()),
                    "after_update": bool(update_at) and time.monotonic() > update_at[0],
                })  # fmt: skip
                if index >= span.get("total", index + 1):
                    past_total.set()
                if done.is_set():
                    return
        except Exception as exc:
            report["errors"].append(f"frames: {exc!r}")
        finally:
            await output.close()

    events = asyncio.create_task(read_events())
    frames = asyncio.create_task(read_frames())
    media = job.start_media(MediaPublishConfig(tracks=[VideoOutputConfig(fps=args.fps)]))
    t0 = time.monotonic()
    deadline = t0 + args.deadline
    index = 0
    while ("total" not in span or not past_total.is_set()) and time.monotonic() < deadline:
        while media.get_stats().track_queue_stats[0].queue_depth:  # the encoder's turn
            await asyncio.sleep(0.005)
        frame = av.VideoFrame.from_ndarray(input_frame(index), format="rgb24")
        frame.pts = index
        frame.time_base = Fraction(1, args.fps)
        await media.write_frame(frame)
        index += 1
        if "total" not in span and index >= minimum and (report["frames"] or not args.update):
            if args.update:
                await job.control.write(json.loads(args.update))
                update_at.append(time.monotonic())
            span["total"] = index
        await asyncio.sleep(max(0.0, t0 + index / args.fps - time.monotonic()))
    total = span.get("total", index)
    report["frames_in"] = total
    report["tail_frames"] = index - total
    report["past_total"] = past_total.is_set()
    queue = media.get_stats().track_queue_stats[0]
    report["sdk_dropped"] = (queue.frames_dropped_overflow + queue.frames_dropped_debt
                             + queue.frames_dropped_non_monotonic_pts)  # fmt: skip
    done.set()
    await media.close()
    await job.close()
    for task in (frames, events):
        try:
            await asyncio.wait_for(task, 15)
        except TimeoutError:
            task.cancel()
    report["seconds"] = time.monotonic() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("orch_url")
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--fps", type=int, default=FPS)
    # Seconds after which the app stops waiting for the output to pass its frames.
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--params", default="{}")
    parser.add_argument("--update", default="")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    json.dump(report, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
