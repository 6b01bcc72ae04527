"""The live runner as a gateway and an orchestrator see it: a real runner process, its
channels on a real HTTP trickle server (the oracle written from gateway-wire.md 5.2),
input cut as a gateway cuts it, output decoded with PyAV."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from kubepeer_dev.live_clips import (
    clip_segments,
    codec_of,
    decode_audio,
    decode_frames,
    pattern,
    video_start,
)
from kubepeer_dev.trickle_oracle import OracleServer
from tests.runners import RunnerProcess, start_runner, stop
from tests.support import wait_for

TINY = "kubepeer-tiny/sd-turbo"
# Short watchdogs, and one torch thread: two OpenMP threads on a shared two-core machine
# spin against each other and make a tiny model 10x slower.
FAST = {"LIVE_STATUS_INTERVAL_SECONDS": "1", "LIVE_INPUT_TIMEOUT_SECONDS": "3",
        "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def trickle(tmp_path_factory) -> Iterator[OracleServer]:
    server = OracleServer(tmp_path_factory.mktemp("trickle") / "trickle.log")
    yield server
    server.stop()


def live_runner(model_id: str, model_dir: Any, log: Any, **env: str) -> RunnerProcess:
    return start_runner(
        {"PIPELINE": "live-video-to-video", "MODEL_ID": model_id, "MODEL_DIR": str(model_dir),
         **FAST, **env},
        log,
    )  # fmt: skip


@pytest.fixture(scope="module")
def noop_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    runner = live_runner("noop", tiny_models, tmp_path_factory.mktemp("noop") / "runner.log")
    yield runner
    stop(runner)


@pytest.fixture(scope="module")
def tiny_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    runner = live_runner(TINY, tiny_models, tmp_path_factory.mktemp("tiny") / "runner.log")
    yield runner
    stop(runner)


class Stream:
    """One stream's four channels, as the orchestrator creates them (5.1)."""

    def __init__(self, trickle: OracleServer, runner: RunnerProcess) -> None:
        self.trickle, self.runner = trickle, runner
        self.mid = uuid.uuid4().hex[:12]
        self.input, self.output = self.mid, f"{self.mid}-out"
        self.control, self.events = f"{self.mid}-control", f"{self.mid}-events"
        trickle.create(self.input, self.output, self.control, self.events)
        self.next_event = 0

    def start(self, model_id: str, params: dict[str, Any]) -> Any:
        self.start_reading_events()
        with self.runner.client() as client:
            return client.post("/live-video-to-video", json={
                "subscribe_url": self.trickle.url(self.input),
                "publish_url": self.trickle.url(self.output),
                "control_url": self.trickle.url(self.control),
                "events_url": self.trickle.url(self.events),
                "model_id": model_id, "params": params, "gateway_request_id": self.mid,
                "manifest_id": self.mid, "stream_id": "stream-" + self.mid,
            })  # fmt: skip

    def start_reading_events(self) -> None:
        """Read the events channel in the background, as the gateway does, from seq 0
        until the channel closes (skipping ahead when the ring has moved on)."""

        def read() -> None:
            seq = 0
            while True:
                try:
                    segment = self.trickle.read(self.events, seq)
                except httpx.HTTPError:
                    return  # the server stopped at the end of the module
                if segment.status == 470:
                    seq = int(segment.headers["Lp-Trickle-Latest"])
                    continue
                if segment.status != 200 or "Lp-Trickle-Closed" in segment.headers:
                    return
                message = json.loads(segment.body)
                assert message["queue_event_type"] == "ai_stream_events"
                self.seen.append(message["event"])
                seq += 1

        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=read, daemon=True).start()

    def events_until(self, wanted: Any, timeout: float = 30) -> list[dict[str, Any]]:
        """The events seen since the last call's, up to the first that is `wanted`."""

        def end_of_wanted() -> int | None:
            found = (i for i in range(self.next_event, len(self.seen)) if wanted(self.seen[i]))
            return next((i + 1 for i in found), None)

        end = wait_for(end_of_wanted, timeout=timeout, what=f"an event; saw {self.seen}")
        events, self.next_event = self.seen[self.next_event : end], end
        return events


def health(runner: RunnerProcess) -> str:
    with runner.client() as client:
        return client.get("/health").json()["status"]


def fitted(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """What the requested size means (gateway-wire.md 5.3: scaled and cropped): cover the
    size, keep the centre. Computed with PIL, independently of the runner's code."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    scaled = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    top, left = (size[1] - height) // 2, (size[0] - width) // 2
    return scaled[top : top + height, left : left + width]


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_noop_stream_resizes_every_frame_and_reports_until_the_input_closes(noop_runner, trickle):
    stream = Stream(trickle, noop_runner)
    assert health(noop_runner) == "IDLE"
    response = stream.start("noop", {"width": 96, "height": 64})
    assert response.status_code == 200, response.text
    assert response.json()["manifest_id"] == stream.mid
    assert health(noop_runner) == "OK"

    segments = clip_segments(24, 12, 160, 90, 1.0)
    assert len(segments) == 2
    out_frames = []
    for seq, segment in enumerate(segments):
        trickle.publish(stream.input, seq, segment)
        out = trickle.read(stream.output, seq)
        assert out.status == 200
        assert codec_of(out.body) == "h264"
        frames = decode_frames(out.body)
        assert len(frames) == len(decode_frames(segment))  # every frame, none dropped
        out_frames += frames
    assert {f.shape for f in out_frames} == {(64, 96, 3)}
    # The frames are the input's, in order: each is closest to its own input frame.
    expected = [fitted(pattern(i, 160, 90), 96, 64) for i in range(24)]
    for i, frame in enumerate(out_frames):
        own = distance(frame, expected[i])
        assert own < 12, (i, own)
        for j in (i - 3, i + 3):
            if 0 <= j < 24:
                assert own < distance(frame, expected[j]), (i, j)

    status = stream.events_until(lambda e: e["type"] == "status" and e["frames_out"] >= 24)[-1]
    assert status["state"] == "ONLINE"
    assert (status["frames_in"], status["frames_dropped"]) == (24, 0)
    assert status["inference_status"]["last_params"]["width"] == 96

    trickle.close(stream.input)  # the gateway stops the stream
    final = stream.events_until(lambda e: e.get("state") == "OFFLINE")[-1]
    assert final["end_reason"] == "input channel closed"
    after = trickle.read(stream.output, 2, timeout=10)  # the runner closed its output
    assert after.status == 404 or after.headers.get("Lp-Trickle-Closed") == "terminated"
    wait_for(lambda: health(noop_runner) == "IDLE", timeout=10, what="IDLE after the stream")


def test_the_input_audio_is_passed_through_on_the_input_timeline(noop_runner, trickle):
    """gateway-wire.md 5.3: audio frames pass through the runner (re-encoded to Opus 48 kHz
    mono); each output segment carries its input segment's sound at the same times."""
    stream = Stream(trickle, noop_runner)
    assert stream.start("noop", {"width": 96, "height": 64}).status_code == 200
    segments = clip_segments(24, 12, 160, 90, 1.0, tone_hz=440)
    assert len(segments) == 2
    for seq, segment in enumerate(segments):
        trickle.publish(stream.input, seq, segment)
        out = trickle.read(stream.output, seq)
        assert out.status == 200
        heard, played = decode_audio(out.body), decode_audio(segment)
        assert heard is not None, f"output segment {seq} has no audio track"
        assert (heard.codec, heard.rate, heard.layout) == ("opus", 48000, "mono")
        assert abs(heard.dominant_hz() - 440) < 5  # the input's tone, not silence
        assert abs(heard.start - played.start) < 0.03  # Opus's priming is 6.5 ms
        assert abs(heard.seconds - played.seconds) < 0.06  # whole 20 ms Opus frames
        assert abs(heard.start - video_start(out.body)) < 0.05  # in step with the video
        assert len(decode_frames(out.body)) == len(decode_frames(segment))
    trickle.close(stream.input)
    wait_for(lambda: health(noop_runner) == "IDLE", timeout=10, what="IDLE after the stream")


def test_a_stream_whose_input_stops_is_torn_down(noop_runner, trickle):
    stream = Stream(trickle, noop_runner)
    assert stream.start("noop", {"width": 64, "height": 64}).status_code == 200
    trickle.publish(stream.input, 0, clip_segments(6, 12, 64, 64, 1.0)[0])
    assert trickle.read(stream.output, 0).status == 200
    assert health(noop_runner) == "OK"
    started = time.monotonic()  # then nothing more: LIVE_INPUT_TIMEOUT_SECONDS is 3
    final = stream.events_until(lambda e: e.get("state") == "OFFLINE", timeout=20)[-1]
    assert final["end_reason"] == "no input for 3 s"
    assert time.monotonic() - started >= 2
    wait_for(lambda: health(noop_runner) == "IDLE", timeout=10, what="IDLE after teardown")


def test_a_stream_whose_output_the_orchestrator_closes_stops_at_once(noop_runner, trickle):
    stream = Stream(trickle, noop_runner)
    assert stream.start("noop", {"width": 64, "height": 64}).status_code == 200
    segments = clip_segments(12, 12, 64, 64, 0.5)
    trickle.publish(stream.input, 0, segments[0])
    assert trickle.read(stream.output, 0).status == 200
    trickle.close(stream.output)  # e.g. the balance ran out (gateway-wire.md 3.5)
    trickle.publish(stream.input, 1, segments[1])  # the input still flows
    final = stream.events_until(lambda e: e.get("state") == "OFFLINE")[-1]
    assert stream.output in final["end_reason"]
    wait_for(lambda: health(noop_runner) == "IDLE", timeout=10, what="IDLE after the close")


def test_control_params_change_the_model_output_without_a_restart(tiny_runner, trickle):
    stream = Stream(trickle, tiny_runner)
    response = stream.start(TINY, {"width": 64, "height": 64, "prompt": "a cat", "seed": 1})
    assert response.status_code == 200, response.text
    segment = clip_segments(4, 12, 64, 64, 1.0)[0]
    inputs = decode_frames(segment)

    def run(seq: int) -> list[np.ndarray]:
        trickle.publish(stream.input, seq, segment)
        out = trickle.read(stream.output, seq)
        assert out.status == 200
        frames = decode_frames(out.body)
        assert len(frames) == len(inputs)
        assert frames[0].shape == (64, 64, 3)
        return frames

    first = run(0)
    # The model transforms every frame: far from its input, unlike the codec's loss.
    assert all(distance(out, inp) > 20 for out, inp in zip(first, inputs, strict=True))
    again = run(1)  # same frames, same params: the same picture (fixed noise per stream)
    same = max(distance(a, b) for a, b in zip(first, again, strict=True))

    trickle.publish(stream.control, 0, json.dumps({"prompt": "a dog", "strength": 0.9}).encode())
    stream.events_until(lambda e: e["type"] == "params_update")
    changed = run(2)
    moved = min(distance(a, b) for a, b in zip(first, changed, strict=True))
    assert moved > 3 * max(same, 1), (moved, same)

    # A bad control message is reported with its field and value and changes nothing.
    trickle.publish(stream.control, 1, json.dumps({"strength": 7}).encode())
    error = stream.events_until(lambda e: e["type"] == "error")[-1]
    assert "params.strength 7" in error["message"]
    status = stream.events_until(lambda e: e["type"] == "status")[-1]
    assert status["inference_status"]["last_params"]["strength"] == 0.9
    trickle.publish(stream.control, 2, b'{"keep":"alive"}')  # the gateway's keepalive
    trickle.close(stream.input)
    stream.events_until(lambda e: e.get("state") == "OFFLINE")
    wait_for(lambda: health(tiny_runner) == "IDLE", timeout=10, what="IDLE after the stream")


def test_a_slow_model_drops_frames_instead_of_queueing_them(tiny_models, trickle, tmp_path):
    runner = live_runner(TINY, tiny_models, tmp_path / "runner.log", LIVE_MAX_QUEUED_FRAMES="2")
    try:
        stream = Stream(trickle, runner)
        assert stream.start(TINY, {"width": 128, "height": 128}).status_code == 200
        segments = clip_segments(36, 12, 128, 128, 1.0)
        for seq, segment in enumerate(segments):  # all at once: faster than the model
            trickle.publish(stream.input, seq, segment)
        # Then nothing: the input timeout ends the stream once the backlog is drained.
        published, seq = 0, 0
        while (out := trickle.read(stream.output, seq, timeout=60)).status == 200:
            if out.headers.get("Lp-Trickle-Closed"):
                break
            published += len(decode_frames(out.body))
            seq += 1
        final = stream.events_until(lambda e: e.get("state") == "OFFLINE", timeout=60)[-1]
        assert final["frames_in"] == 36
        assert final["frames_dropped"] > 0
        assert final["frames_out"] + final["frames_dropped"] == 36
        assert published == final["frames_out"]
        assert seq == final["segments_out"]
    finally:
        stop(runner)


@pytest.mark.parametrize(
    ("params", "named"),
    [({"width": 100}, "params.width 100"), ({"height": "tall"}, "params.height 'tall'"),
     ({"strength": 0}, "params.strength 0"), ({"num_inference_steps": 9}, "steps 9")],
)  # fmt: skip
def test_a_start_with_bad_params_is_refused_and_starts_nothing(noop_runner, trickle, params, named):
    stream = Stream(trickle, noop_runner)
    response = stream.start("noop", params)
    assert response.status_code == 400
    assert named in response.json()["detail"]["msg"]
    assert health(noop_runner) == "IDLE"


def test_a_start_for_another_model_is_refused(noop_runner, trickle):
    response = Stream(trickle, noop_runner).start(TINY, {})
    assert response.status_code == 400
    assert TINY in response.json()["detail"]["msg"]


def test_a_stream_beyond_capacity_is_refused(tiny_models, trickle, tmp_path):
    runner = live_runner("noop", tiny_models, tmp_path / "runner.log", CAPACITY="1")
    try:
        first, second = Stream(trickle, runner), Stream(trickle, runner)
        assert first.start("noop", {}).status_code == 200
        refused = second.start("noop", {})
        assert refused.status_code == 500
        assert "capacity" in refused.json()["detail"]["msg"]
        trickle.close(first.input)
        wait_for(lambda: health(runner) == "IDLE", timeout=10, what="IDLE after the stream")
        assert second.start("noop", {}).status_code == 200  # the slot is free again
    finally:
        stop(runner)
