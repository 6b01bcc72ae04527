"""live-video-to-video: the control-plane contract of the route, with the `noop` pipeline.

A real live pipeline subscribes to `subscribe_url` (trickle segments in), runs every
frame through the model, publishes to `publish_url`, takes parameter updates from
`control_url` and reports on `events_url`. That streaming loop (a frame decoder, a GPU
frame pipeline and a trickle client) is not built yet; this module accepts and echoes
the request exactly as ai-runner does, so gateways and go-livepeer can be tested
against it, and refuses any model but `noop`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fastapi import FastAPI
from pydantic import BaseModel, Field, field_validator

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.serving import Device, bad_request, serve

PIPELINE = "live-video-to-video"
BODY_LIMIT = "max_json_bytes"
SUPPORTED = ("noop",)


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


class LiveVideoToVideoResponse(BaseModel):
    subscribe_url: str
    publish_url: str
    control_url: str
    events_url: str
    request_id: str
    manifest_id: str
    stream_id: str


def load(spec: ModelSpec, model_dir: Path, device: Device) -> str:
    if spec.model_id not in SUPPORTED:
        raise ValueError(
            f"live-video-to-video serves {', '.join(SUPPORTED)} only; "
            f"'{spec.model_id}' needs the streaming pipeline (not built yet)"
        )
    return spec.model_id


def register(app: FastAPI, runner: Any) -> None:
    async def live_video_to_video(req: LiveVideoToVideoParams) -> LiveVideoToVideoResponse:
        await runner.model(PIPELINE, req.model_id)
        if req.subscribe_url == req.publish_url:
            raise bad_request("subscribe_url and publish_url must differ")
        return LiveVideoToVideoResponse(
            subscribe_url=req.subscribe_url,
            publish_url=req.publish_url,
            control_url=req.control_url,
            events_url=req.events_url,
            request_id=req.gateway_request_id or uuid.uuid4().hex,
            manifest_id=req.manifest_id,
            stream_id=req.stream_id,
        )

    serve(app, "/" + PIPELINE, live_video_to_video, "genLiveVideoToVideo", LiveVideoToVideoResponse)
