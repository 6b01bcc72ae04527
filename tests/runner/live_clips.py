"""Test input cut as a gateway cuts it (gateway-wire.md 5.3: ffmpeg's segment muxer, one
MPEG-TS file per segment), and output read back frame by frame, with PyAV directly (not
through the runner's media code)."""

from __future__ import annotations

import io
import tempfile
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


def clip_segments(frames: int, fps: int, width: int, height: int, seconds: float) -> list[bytes]:
    """An H.264 clip of `frames` frames cut into MPEG-TS segments of about `seconds`,
    each starting on a keyframe, as ffmpeg `-f segment` cuts a gateway's ingest."""
    with tempfile.TemporaryDirectory() as tmp:
        out = av.open(
            str(Path(tmp) / "%03d.ts"), "w", format="segment",
            options={"segment_time": str(seconds), "segment_format": "mpegts"},
        )  # fmt: skip
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = max(1, round(fps * seconds))
        stream.codec_context.options = {"bf": "0", "tune": "zerolatency"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        out.close()
        return [p.read_bytes() for p in sorted(Path(tmp).glob("*.ts"))]


def decode_frames(segment: bytes) -> list[np.ndarray]:
    """Every video frame of one MPEG-TS segment, as RGB."""
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def codec_of(segment: bytes) -> str:
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        return container.streams.video[0].codec_context.name
