"""live-video-to-video: start a stream that runs every frame of a trickle channel through
the model and publishes the result (the streaming itself is kubepeer_runner.live).

The route answers at once, as go-livepeer's 5 s budget for the whole start demands: the
stream runs in the background, waiting for the model if it is still loading. Models:
`noop` (frames out as they came, resized) or a diffusers image-to-image model id from
MODEL_DIR, run one or two denoising steps per frame (live/models.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fastapi import FastAPI
from pydantic import BaseModel, Field, ValidationError, field_validator

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.live.models import LiveParams, load_model, params_error
from kubepeer_runner.live.stream import (
    LiveStream,
    LiveStreams,
    LiveVideoToVideoResponse,
    StreamSettings,
)
from kubepeer_runner.serving import Device, bad_request, check_size, serve

PIPELINE = "live-video-to-video"
BODY_LIMIT = "max_json_bytes"


def _url(value: str) -> str:
    if value and urlparse(value).scheme not in ("http", "https"):
        raise ValueError(f"'{value}' is not an http(s) URL")
    return value


class LiveVideoToVideoParams(BaseModel):
    subscribe_url: str = Field(min_length=1)
    publish_url: str = Field(min_length=1)
    control_url: str = ""
    events_url: str = ""
    model_id: str = ""
    params: dict[str, Any] = {}  # pydantic copies it per request
    gateway_request_id: str = ""
    manifest_id: str = ""
    stream_id: str = ""

    _check_urls = field_validator("subscribe_url", "publish_url", "control_url", "events_url")(_url)


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Any:
    return load_model(spec.model_id, model_dir, device, spec.optimizations)


def register(app: FastAPI, runner: Any) -> None:
    spec = runner.spec(PIPELINE)
    limits = runner.limits
    streams = LiveStreams(
        runner.config.capacity(spec),
        StreamSettings(
            limits.live_input_timeout_seconds,
            limits.live_status_interval_seconds,
            limits.live_max_queued_frames,
        ),
    )
    runner.live = streams

    async def transform(image: Any, params: LiveParams) -> Any:
        model = await runner.model(PIPELINE, None)  # waits while the model loads
        return await runner.queue.run(model, image, params)

    async def live_video_to_video(req: LiveVideoToVideoParams) -> LiveVideoToVideoResponse:
        if req.model_id and req.model_id != spec.model_id:
            raise bad_request(
                f"pipeline configured with {spec.model_id} but called with {req.model_id}"
            )
        if req.subscribe_url == req.publish_url:
            raise bad_request("subscribe_url and publish_url must differ")
        try:
            params = LiveParams.model_validate(req.params)
        except ValidationError as exc:
            raise bad_request(params_error(exc)) from None
        check_size(params.height, params.width, limits.max_output_pixels)
        started = LiveVideoToVideoResponse(
            subscribe_url=req.subscribe_url,
            publish_url=req.publish_url,
            control_url=req.control_url,
            events_url=req.events_url,
            request_id=req.gateway_request_id or uuid.uuid4().hex,
            manifest_id=req.manifest_id,
            stream_id=req.stream_id,
        )
        streams.start(LiveStream(started, spec.model_id, params, transform, streams.settings))
        return started

    serve(app, "/" + PIPELINE, live_video_to_video, "genLiveVideoToVideo", LiveVideoToVideoResponse)
