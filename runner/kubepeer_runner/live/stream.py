"""One live stream: input segments -> frames -> model -> H.264 segments out, steered by
the control channel and reported on the events channel (gateway-wire.md 5.3).

Four stages joined by bounded queues, so memory stays flat whatever the model's speed:

  read input (trickle GET) -> decode (worker thread) -> [backlog: at most N frames;
  the oldest frame is dropped when full] -> model (the device thread) -> [8 frames] ->
  encode (worker thread) + publish (trickle POST), one output segment per input segment.

An input segment's audio skips the model: it rides on the segment's end mark (never
dropped) and is re-encoded into the output segment made from that input segment.

The event loop only moves bytes and frames between them, so /health keeps answering.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from kubepeer_runner.live.media import SegmentDecoder, SegmentEncoder
from kubepeer_runner.live.models import LiveParams, params_error
from kubepeer_runner.live.trickle import ChannelClosed, Publisher, Subscriber, open_session
from kubepeer_runner.serving import RunnerError, off_loop

log = logging.getLogger("kubepeer_runner.live")

PIPELINE = "live-video-to-video"
MAX_STATUS_INTERVAL = 10.0  # the gateway drops a stream after 30 s without an event


@dataclass(frozen=True)
class StreamSettings:
    input_timeout: float  # no new input segment for this long: the stream is over
    status_interval: float
    max_queued_frames: int


class LiveVideoToVideoResponse(BaseModel):
    """A started stream, as ai-runner answers its start: its channels and identity."""

    subscribe_url: str
    publish_url: str
    control_url: str
    events_url: str
    request_id: str
    manifest_id: str
    stream_id: str


@dataclass(frozen=True)
class SegmentEnd:
    """Marks where an input segment's frames end, so output segments follow input ones;
    carries the segment's audio frames."""

    seq: int
    audio: tuple[Any, ...] = ()


END = object()  # no more input


def is_frame(item: Any) -> bool:
    return item is not END and not isinstance(item, SegmentEnd)


@dataclass
class Counters:
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    segments_in: int = 0
    segments_out: int = 0
    last_input_time: float | None = None
    last_output_time: float | None = None


class FrameBacklog:
    """Decoded frames waiting for the model, at most `limit`: when a slow model lets it
    fill, the oldest frame goes (the viewer sees the newest). Segment marks stay."""

    def __init__(self, limit: int, on_drop: Callable[[], None]) -> None:
        self.limit, self.on_drop = limit, on_drop
        self._items: collections.deque[Any] = collections.deque()
        self._frames = 0
        self._ready = asyncio.Event()

    def put(self, item: Any) -> None:
        if is_frame(item):
            if self._frames >= self.limit:
                self._drop_oldest_frame()
            self._frames += 1
        self._items.append(item)
        self._ready.set()

    def _drop_oldest_frame(self) -> None:
        for i, queued in enumerate(self._items):
            if is_frame(queued):
                del self._items[i]
                self._frames -= 1
                self.on_drop()
                return

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if is_frame(item):
            self._frames -= 1
        return item


Transform = Callable[[Any, LiveParams], Awaitable[Any]]


class LiveStream:
    def __init__(
        self,
        request: LiveVideoToVideoResponse,
        model_id: str,
        params: LiveParams,
        transform: Transform,
        settings: StreamSettings,
    ) -> None:
        self.request, self.model_id, self.params = request, model_id, params
        self.transform, self.settings = transform, settings
        self.counters = Counters()
        self.started = time.time()
        self.params_updated: float | None = None
        self.last_error: tuple[float, str] | None = None
        self.ended: str | None = None
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)

    # -- the stream's life ---------------------------------------------------------------

    async def run(self) -> None:
        req = self.request
        async with open_session() as session:
            output = Publisher(session, req.publish_url)
            events = Publisher(session, req.events_url) if req.events_url else None
            side = [asyncio.create_task(self._report(events))]
            side.append(asyncio.create_task(self._status_loop()))
            if req.control_url:
                side.append(
                    asyncio.create_task(self._control(Subscriber(session, req.control_url)))
                )
            try:
                self.ended = await self._media(session, output)
            finally:
                log.info("stream %s ended: %s", req.request_id, self.ended)
                self.emit(self.status("OFFLINE"))
                await self._events.put(None)
                await asyncio.wait(side[:1], timeout=5)
                for task in side:
                    task.cancel()
                await output.close()
                if events is not None:
                    await events.close()

    async def _media(self, session: Any, output: Publisher) -> str:
        """Run the stages until the input stops (then drain what is queued), the
        orchestrator closes a channel (then stop at once: nobody reads the output any
        more) or a stage fails."""
        backlog = FrameBacklog(self.settings.max_queued_frames, self._dropped)
        processed: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
        source = Subscriber(session, self.request.subscribe_url)
        stages = [
            asyncio.create_task(self._read_input(source, backlog)),
            asyncio.create_task(self._run_model(backlog, processed)),
            asyncio.create_task(self._encode_and_publish(processed, output)),
        ]  # fmt: skip
        reason = "input ended"
        try:
            done, _ = await asyncio.wait(stages, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if isinstance(exc, ChannelClosed):
                        reason = str(exc)
                    else:
                        reason = f"{type(exc).__name__}: {exc}"
                        self.error(reason)
                    break
            else:
                reason = stages[0].result()
        finally:
            for task in stages:
                task.cancel()
        return reason

    def _dropped(self) -> None:
        self.counters.frames_dropped += 1

    async def _read_input(self, subscriber: Subscriber, backlog: FrameBacklog) -> str:
        decoder = SegmentDecoder()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.settings.input_timeout):
                        data = await subscriber.next()
                except TimeoutError:
                    return f"no input for {self.settings.input_timeout:g} s"
                except ChannelClosed:
                    raise ChannelClosed("input channel closed") from None
                seq = subscriber.seq - 1
                self.counters.segments_in += 1
                self.counters.last_input_time = time.time()
                size = self.params.width, self.params.height
                frames = await off_loop(decoder.decode, data, *size)
                self.counters.frames_in += len(frames)
                for frame in frames:
                    backlog.put(frame)
                backlog.put(SegmentEnd(seq, tuple(decoder.take_audio())))
        finally:
            backlog.put(END)

    async def _run_model(self, backlog: FrameBacklog, processed: asyncio.Queue[Any]) -> None:
        while (item := await backlog.get()) is not END:
            if isinstance(item, SegmentEnd):
                await processed.put(item)
                continue
            try:
                image = await self.transform(item.image, self.params)
            except RunnerError as exc:  # this frame is lost; the stream goes on
                self.error(exc.msg)
                self._dropped()
                continue
            await processed.put((image, item.pts))
        await processed.put(END)

    async def _encode_and_publish(self, processed: asyncio.Queue[Any], output: Publisher) -> None:
        encoder: SegmentEncoder | None = None
        while (item := await processed.get()) is not END:
            if isinstance(item, SegmentEnd):
                if encoder is None and item.audio:  # every frame dropped: the sound goes on
                    encoder = SegmentEncoder(self.params.width, self.params.height)
                if encoder is not None:
                    await output.write(await off_loop(encoder.finish, item.audio))
                    self.counters.segments_out += 1
                    self.counters.last_output_time = time.time()
                    encoder = None
                continue
            image, pts = item
            height, width = image.shape[:2]
            if encoder is None:
                encoder = SegmentEncoder(width, height)
            await off_loop(encoder.encode, image, pts)
            self.counters.frames_out += 1

    # -- control and events --------------------------------------------------------------

    async def _control(self, subscriber: Subscriber) -> None:
        """Apply each params message between two frames; a bad one changes nothing."""
        while True:
            try:
                data = await subscriber.next()
            except ChannelClosed:
                return
            self.apply_control(data)

    def apply_control(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.error(f"control message is not JSON: {data[:80]!r}")
            return
        if not isinstance(message, dict):
            self.error(f"control message {message!r} is not a JSON object of params")
            return
        if set(message) == {"keep"}:  # the gateway's keepalive, every 10 s
            return
        changes = message.get("params", message) if set(message) <= {"params"} else message
        try:
            self.params = self.params.updated(changes)
        except ValidationError as exc:
            self.error(params_error(exc))
            return
        self.params_updated = time.time()
        log.info("stream %s params now %s", self.request.request_id, self.params.model_dump())
        self.emit({"type": "params_update", "params": self.params.model_dump()})

    def error(self, message: str) -> None:
        log.warning("stream %s: %s", self.request.request_id, message)
        self.last_error = (time.time(), message)
        self.emit({"type": "error", "message": message})

    def emit(self, event: dict[str, Any]) -> None:
        """Queue an event for the events channel; if that channel is stuck, drop it."""
        event = {**event, "timestamp": int(time.time() * 1000)}
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait({"event": event, "queue_event_type": "ai_stream_events"})

    async def _report(self, events: Publisher | None) -> None:
        while (message := await self._events.get()) is not None:
            if events is None:
                continue
            try:
                await events.write(json.dumps(message).encode())
            except ChannelClosed:
                return

    async def _status_loop(self) -> None:
        interval = min(self.settings.status_interval, MAX_STATUS_INTERVAL)
        previous = None
        while True:
            self.emit(self.status("ONLINE", previous))
            previous = (time.monotonic(), self.counters.frames_in, self.counters.frames_out)
            await asyncio.sleep(interval)

    def status(self, state: str, since: tuple[float, int, int] | None = None) -> dict[str, Any]:
        c, req = self.counters, self.request
        input_fps = output_fps = 0.0
        if since is not None:
            elapsed = time.monotonic() - since[0]
            input_fps = (c.frames_in - since[1]) / elapsed
            output_fps = (c.frames_out - since[2]) / elapsed
        return {
            "type": "status",
            "pipeline": PIPELINE,
            "model_id": self.model_id,
            "request_id": req.request_id,
            "manifest_id": req.manifest_id,
            "stream_id": req.stream_id,
            "state": state,
            "start_time": self.started,
            "input_status": {"fps": round(input_fps, 2), "last_input_time": c.last_input_time},
            "inference_status": {
                "fps": round(output_fps, 2),
                "last_output_time": c.last_output_time,
                "last_params": self.params.model_dump(),
                "last_params_update_time": self.params_updated,
                "last_error": self.last_error[1] if self.last_error else None,
                "last_error_time": self.last_error[0] if self.last_error else None,
            },
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "frames_dropped": c.frames_dropped,
            "segments_in": c.segments_in,
            "segments_out": c.segments_out,
            "end_reason": self.ended,
        }


@dataclass
class LiveStreams:
    """The streams a runner is serving, at most `capacity` at once."""

    capacity: int
    settings: StreamSettings
    streams: dict[str, tuple[LiveStream, asyncio.Task[None]]] = field(default_factory=dict)

    @property
    def running(self) -> int:
        return len(self.streams)

    def start(self, stream: LiveStream) -> None:
        key = stream.request.request_id
        if key in self.streams:
            raise RunnerError(400, f"stream {key} is already running")
        if len(self.streams) >= self.capacity:
            raise RunnerError(
                500, f"this runner is serving {len(self.streams)} streams, its capacity"
            )
        task = asyncio.create_task(stream.run(), name=f"live {key}")
        self.streams[key] = (stream, task)
        task.add_done_callback(lambda _: self.streams.pop(key, None))

    async def stop_all(self) -> None:
        tasks = [task for _, task in self.streams.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
