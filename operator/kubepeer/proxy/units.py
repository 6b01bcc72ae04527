"""Billed units of a job, as go-livepeer's `handleAIRequest` counts them (gateway-wire 3.3).

`fields` is the request as the gateway sent it: the JSON object, or the multipart form
(strings, and bytes for files).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from kubepeer.livepeer.capabilities import Pipeline

I2V_FRAMES = 25
DEFAULT_T2I_SIDE = 512
DEFAULT_I2V_HEIGHT, DEFAULT_I2V_WIDTH = 576, 1024


class UnitsError(ValueError):
    """400: the job cannot be priced; the text is what the gateway sees."""


def _int(fields: Mapping[str, Any], name: str, default: int) -> int:
    value = fields.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UnitsError(f"{name} must be an integer, got {value!r}") from None


def image_pixels(data: Any) -> int:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray):
        raise UnitsError("image must be a file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        # A header claiming more pixels than PIL will ever decode is no image to bill.
        raise UnitsError(f"Unable to decode image: {exc}") from None
    return width * height


def audio_seconds(data: Any) -> int:
    """Whole seconds of audio, truncated, probed with PyAV (go-livepeer uses ffprobe)."""
    import av

    if not isinstance(data, bytes | bytearray):
        raise UnitsError("Unable to calculate duration")
    try:
        with av.open(io.BytesIO(data)) as container:
            if container.duration is not None:
                return int(container.duration // av.time_base)
            stream = container.streams.audio[0]
            return int(stream.duration * stream.time_base)
    except (av.FFmpegError, IndexError, TypeError, ValueError):
        raise UnitsError("Unable to calculate duration") from None


def billed_units(pipeline: Pipeline, fields: Mapping[str, Any]) -> int:
    match pipeline:
        case Pipeline.TEXT_TO_IMAGE:
            return (
                _int(fields, "height", DEFAULT_T2I_SIDE)
                * _int(fields, "width", DEFAULT_T2I_SIDE)
                * max(1, _int(fields, "num_images_per_prompt", 1))
            )
        case Pipeline.IMAGE_TO_IMAGE:
            return image_pixels(fields.get("image")) * max(
                1, _int(fields, "num_images_per_prompt", 1)
            )
        case Pipeline.UPSCALE | Pipeline.SEGMENT_ANYTHING_2 | Pipeline.IMAGE_TO_TEXT:
            return image_pixels(fields.get("image"))
        case Pipeline.IMAGE_TO_VIDEO:
            return (
                _int(fields, "height", DEFAULT_I2V_HEIGHT)
                * _int(fields, "width", DEFAULT_I2V_WIDTH)
                * I2V_FRAMES
            )
        case Pipeline.AUDIO_TO_TEXT:
            seconds = audio_seconds(fields.get("audio"))
            if seconds <= 0:
                raise UnitsError("Unable to calculate duration")
            return seconds * 1000
        case Pipeline.LLM:
            if fields.get("max_tokens") in (None, 0):
                raise UnitsError("MaxTokens not specified")
            return _int(fields, "max_tokens", 0)
        case Pipeline.TEXT_TO_SPEECH:
            return 1000 * len(str(fields.get("text") or ""))
    raise UnitsError(f"{pipeline.value} is not a batch pipeline")
