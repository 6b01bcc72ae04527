"""One module per Livepeer pipeline, each with the same two functions:

load(spec, model_dir, device) -> a loaded model
register(app, runner)         -> its routes, which ask runner.model() and runner.queue
"""

from __future__ import annotations

from types import ModuleType

from kubepeer_runner.pipelines import (
    audio_to_text,
    image_to_image,
    image_to_text,
    image_to_video,
    live_video_to_video,
    llm,
    segment_anything_2,
    text_to_image,
    text_to_speech,
    upscale,
)

MODULES = (
    text_to_image,
    image_to_image,
    upscale,
    image_to_video,
    image_to_text,
    audio_to_text,
    segment_anything_2,
    text_to_speech,
    llm,
    live_video_to_video,
)
PIPELINES: dict[str, ModuleType] = {m.PIPELINE: m for m in MODULES}
