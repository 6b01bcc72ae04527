"""Frames in and out of MPEG-TS segments (PyAV's own FFmpeg, libx264 for H.264).

Decoding keeps one decoder for the whole stream, so a segment that does not start on a
keyframe still decodes from the frames before it; each output segment is encoded by a
fresh encoder, so it starts with an IDR frame and a player can join at any segment.
Audio skips the model: an input segment's audio frames, decoded with their own times, are
re-encoded into the output segment made from that input segment, as ai-runner does (Opus,
48 kHz mono: gateway-wire.md 5.3), so sound and pictures keep the input's timeline.
Everything here blocks: callers run it off the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

MPEGTS_TIME_BASE = Fraction(1, 90000)
# ai-runner's encoder settings (gateway-wire.md 5.3): low latency, no B-frames, an IDR
# every 2 s; superfast keeps a 512x512 frame within a few milliseconds on one core.
X264_OPTIONS = {"preset": "superfast", "tune": "zerolatency", "bf": "0", "forced-idr": "1"}
KEYFRAME_SECONDS = 2
MAX_FPS = 24  # ai-runner caps input video at 24 fps
AUDIO_CODEC, AUDIO_RATE, AUDIO_LAYOUT = "libopus", 48000, "mono"  # ai-runner's output audio


@dataclass(frozen=True)
class Frame:
    """One video frame as the model sees it: RGB uint8 (H, W, 3), with its time."""

    image: np.ndarray
    pts: int  # in MPEGTS_TIME_BASE units


def fit(frame: Any, width: int, height: int) -> np.ndarray:
    """Scale to cover width x height and crop the centre: the requested size, no bars."""
    scale = max(width / frame.width, height / frame.height)
    scaled_w = max(width, round(frame.width * scale))
    scaled_h = max(height, round(frame.height * scale))
    image = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24").to_ndarray()
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])


class SegmentDecoder:
    """Video frames of successive MPEG-TS segments of one stream."""

    def __init__(self, max_fps: float = MAX_FPS) -> None:
        self._codec: Any = None
        self._audio_codec: Any = None
        self._audio: list[Any] = []
        self._min_gap = Fraction(1) / Fraction(max_fps).limit_denominator(1000)
        self._last_kept: Fraction | None = None

    def decode(self, segment: bytes, width: int, height: int) -> list[Frame]:
        """The frames of one segment, fitted to width x height, at most MAX_FPS. Its audio
        frames wait for `take_audio`."""
        import av

        frames: list[Frame] = []
        try:
            container = av.open(io.BytesIO(segment), format="mpegts")
        except av.error.FFmpegError:
            return frames  # no stream in it (an empty or cut segment): nothing to show
        with container:
            streams = [*container.streams.video[:1], *container.streams.audio[:1]]
            for stream in streams:
                if stream.type == "video" and self._codec is None:
                    self._codec = _decoder(stream)
                    self._codec.thread_type = "SLICE"  # frame threading delays every frame
                elif stream.type == "audio" and self._audio_codec is None:
                    self._audio_codec = _decoder(stream)
            for packet in container.demux(streams) if streams else ():
                if packet.size == 0:
                    continue
                video = packet.stream.type == "video"
                try:
                    decoded = (self._codec if video else self._audio_codec).decode(packet)
                except av.error.InvalidDataError:
                    continue  # a damaged packet: skip it, as a player would
                time_base = packet.stream.time_base or MPEGTS_TIME_BASE
                for frame in decoded:
                    if not video:
                        if frame.pts is not None:
                            frame.time_base = time_base
                            self._audio.append(frame)
                        continue
                    kept = self._keep(frame, time_base)
                    if kept is not None:
                        frames.append(Frame(fit(frame, width, height), kept))
        return frames

    def take_audio(self) -> list[Any]:
        """The audio frames decoded since the last call (PyAV AudioFrames with times)."""
        audio, self._audio = self._audio, []
        return audio

    def _keep(self, frame: Any, time_base: Fraction) -> int | None:
        if frame.pts is None:
            return None
        seconds = frame.pts * time_base
        if self._last_kept is not None and 0 <= seconds - self._last_kept < self._min_gap * 0.9:
            return None
        self._last_kept = seconds
        return int(seconds / MPEGTS_TIME_BASE)


class SegmentEncoder:
    """One output segment: H.264 frames muxed into MPEG-TS in memory."""

    def __init__(self, width: int, height: int, fps: int = MAX_FPS) -> None:
        import av

        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, "w", format="mpegts")
        self._stream = self._container.add_stream("libx264", rate=fps, options=X264_OPTIONS)
        codec = self._stream.codec_context
        codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
        codec.time_base = MPEGTS_TIME_BASE
        codec.gop_size = KEYFRAME_SECONDS * fps
        self._stream.time_base = MPEGTS_TIME_BASE
        self.frames = 0
        self._last_pts = -1
        self._packets: list[Any] = []  # muxed at finish, once we know if there is audio

    def encode(self, image: np.ndarray, pts: int) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = max(pts, self._last_pts + 1)  # strictly increasing, as muxers demand
        frame.time_base = MPEGTS_TIME_BASE
        self._last_pts = frame.pts
        self._packets += self._stream.encode(frame)
        self.frames += 1

    def finish(self, audio: Sequence[Any] = ()) -> bytes:
        """The segment, with `audio` (decoded frames, any format) re-encoded beside the
        video at its own times; the muxer interleaves the two by time."""
        packets = [*self._packets, *self._stream.encode(None)]
        if audio:
            sound = self._container.add_stream(AUDIO_CODEC, rate=AUDIO_RATE, layout=AUDIO_LAYOUT)
            for frame in audio:
                packets += sound.encode(frame)
            packets += sound.encode(None)
        self._container.mux(packets)
        self._container.close()
        return self._buffer.getvalue()


def _decoder(stream: Any) -> Any:
    import av

    codec = av.CodecContext.create(stream.codec_context.name, "r")
    if stream.codec_context.extradata:
        codec.extradata = stream.codec_context.extradata
    return codec


def encode_clip(frames: list[np.ndarray], fps: int) -> bytes:
    """A whole MPEG-TS/H.264 clip of RGB frames (for tests and the benchmark's input)."""
    step = int(1 / MPEGTS_TIME_BASE) // fps
    encoder = SegmentEncoder(frames[0].shape[1], frames[0].shape[0], fps)
    for i, image in enumerate(frames):
        encoder.encode(image, i * step)
    return encoder.finish()
