"""Test input cut as a gateway cuts it (gateway-wire.md 5.3: ffmpeg's segment muxer, one
MPEG-TS file per segment), and output read back frame by frame, with PyAV directly (not
through the runner's media code)."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def pattern(index: int, width: int, height: int) -> np.ndarray:
    """A frame that differs from its neighbours: a moving gradient with a bright square."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [(x * 255 // width + index * 9) % 256, y * 255 // height, (x + y + index * 5) % 256],
        axis=-1,
    ).astype(np.uint8)
    side = min(width, height) // 4
    left = (index * 7) % (width - side)
    image[side : 2 * side, left : left + side] = 250
    return image


AUDIO_RATE = 44100  # the input's audio as an RTMP ingest usually has it: AAC stereo


def clip_segments(
    frames: int, fps: int, width: int, height: int, seconds: float, tone_hz: float | None = None
) -> list[bytes]:
    """An H.264 clip of `frames` frames cut into MPEG-TS segments of about `seconds`,
    each starting on a keyframe, as ffmpeg `-f segment` cuts a gateway's ingest; with
    `tone_hz`, an AAC track of that sine tone beside the video."""
    with tempfile.TemporaryDirectory() as tmp:
        out = av.open(
            str(Path(tmp) / "%03d.ts"), "w", format="segment",
            options={"segment_time": str(seconds), "segment_format": "mpegts"},
        )  # fmt: skip
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = max(1, round(fps * seconds))
        stream.codec_context.options = {"bf": "0", "tune": "zerolatency"}
        sound = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo") if tone_hz else None
        samples = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
            while sound is not None and samples < (i + 1) * AUDIO_RATE // fps:
                t = (samples + np.arange(1024)) / AUDIO_RATE
                wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
                chunk = av.AudioFrame.from_ndarray(np.stack([wave, wave]), "fltp", "stereo")
                chunk.sample_rate, chunk.pts = AUDIO_RATE, samples
                chunk.time_base = Fraction(1, AUDIO_RATE)
                out.mux(sound.encode(chunk))
                samples += 1024
        out.mux(stream.encode(None))
        if sound is not None:
            out.mux(sound.encode(None))
        out.close()
        return [p.read_bytes() for p in sorted(Path(tmp).glob("*.ts"))]


@dataclass(frozen=True)
class Audio:
    codec: str
    rate: int
    layout: str
    start: float  # seconds, on the segment's timeline
    samples: np.ndarray  # mono float

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    def dominant_hz(self) -> float:
        spectrum = np.abs(np.fft.rfft(self.samples))
        return float(np.fft.rfftfreq(len(self.samples), 1 / self.rate)[spectrum.argmax()])


def decode_audio(segment: bytes) -> Audio | None:
    """The audio track of one MPEG-TS segment, or None when it has none."""
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        mono = np.concatenate([_mono(f) for f in frames])
        return Audio(stream.codec_context.name, frames[0].sample_rate, frames[0].layout.name,
                     float(frames[0].pts * frames[0].time_base), mono)  # fmt: skip


def _mono(frame: av.AudioFrame) -> np.ndarray:
    samples = frame.to_ndarray().astype(np.float64)
    if frame.format.is_planar:  # (channels, samples)
        return samples.mean(axis=0)
    return samples.reshape(-1, len(frame.layout.channels)).mean(axis=1)  # interleaved


def video_start(segment: bytes) -> float:
    """When the segment's first video frame is shown, in seconds."""
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        first = next(container.decode(video=0))
        return float(first.pts * first.time_base)


def decode_frames(segment: bytes) -> list[np.ndarray]:
    """Every video frame of one MPEG-TS segment, as RGB."""
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def codec_of(segment: bytes) -> str:
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        return container.streams.video[0].codec_context.name
