"""The ten Livepeer AI pipelines and the capability ids gateways know them by."""

from __future__ import annotations

from enum import StrEnum


class Pipeline(StrEnum):
    """A Livepeer AI pipeline; the value is also the runner route (`POST /<value>`)."""

    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    IMAGE_TO_VIDEO = "image-to-video"
    UPSCALE = "upscale"
    AUDIO_TO_TEXT = "audio-to-text"
    SEGMENT_ANYTHING_2 = "segment-anything-2"
    LLM = "llm"
    IMAGE_TO_TEXT = "image-to-text"
    LIVE_VIDEO_TO_VIDEO = "live-video-to-video"
    TEXT_TO_SPEECH = "text-to-speech"

    @property
    def capability(self) -> int:
        """The capability id go-livepeer advertises for this pipeline."""
        return CAPABILITY_IDS[self]


CAPABILITY_IDS: dict[Pipeline, int] = {
    Pipeline.TEXT_TO_IMAGE: 27,
    Pipeline.IMAGE_TO_IMAGE: 28,
    Pipeline.IMAGE_TO_VIDEO: 29,
    Pipeline.UPSCALE: 30,
    Pipeline.AUDIO_TO_TEXT: 31,
    Pipeline.SEGMENT_ANYTHING_2: 32,
    Pipeline.LLM: 33,
    Pipeline.IMAGE_TO_TEXT: 34,
    Pipeline.LIVE_VIDEO_TO_VIDEO: 35,
    Pipeline.TEXT_TO_SPEECH: 36,
}
BYOC_CAPABILITY = 37


class OptimizationFlag(StrEnum):
    """Runner optimisation switches, passed to the runner container as env vars."""

    SFAST = "SFAST"
    DEEPCACHE = "DEEPCACHE"
    SFAST_WARMUP = "SFAST_WARMUP"
    BFLOAT16 = "BFLOAT16"
    TORCH_COMPILE = "TORCH_COMPILE"


class Unit(StrEnum):
    """What a price is per. Each pipeline is billed in one Livepeer unit (or per request)."""

    PIXEL = "pixel"
    MILLISECOND = "millisecond"
    CHARACTER = "character"
    TOKEN = "token"
    SECOND = "second"  # live video: a stream's running time
    REQUEST = "request"


BILLING_UNIT: dict[Pipeline, Unit] = {
    Pipeline.TEXT_TO_IMAGE: Unit.PIXEL,
    Pipeline.IMAGE_TO_IMAGE: Unit.PIXEL,
    Pipeline.IMAGE_TO_VIDEO: Unit.PIXEL,
    Pipeline.UPSCALE: Unit.PIXEL,
    Pipeline.SEGMENT_ANYTHING_2: Unit.PIXEL,
    Pipeline.IMAGE_TO_TEXT: Unit.PIXEL,
    Pipeline.AUDIO_TO_TEXT: Unit.MILLISECOND,
    Pipeline.LIVE_VIDEO_TO_VIDEO: Unit.SECOND,
    Pipeline.LLM: Unit.TOKEN,
    Pipeline.TEXT_TO_SPEECH: Unit.CHARACTER,
}


# gateway-wire 3.3/3.5: the wire bills a live stream as 1280x720 pixels at 30 fps per second.
LIVE_PIXELS_PER_SECOND = 1280 * 720 * 30
# Units the wire itself bills in pixels: a price per such unit is per this many pixels.
PIXELS_PER_UNIT = {Unit.SECOND: LIVE_PIXELS_PER_SECOND}


def unit_fits(pipeline: Pipeline, unit: Unit) -> bool:
    """Whether a price in `unit` can be charged for a `pipeline` job."""
    return unit in (BILLING_UNIT[pipeline], Unit.REQUEST)
