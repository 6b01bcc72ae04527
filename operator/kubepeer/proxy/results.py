"""A finished job's reply as go-livepeer sends it (gateway-wire 2.3).

- Only the fields a gateway's Go types know survive (it re-encodes the runner's struct).
- With `Authorization: Livepeer-AI-Worker-1.0`, media become `<serviceURI>/stream/<requestID>/
  <name>` URLs kept for 10 minutes in a store every proxy replica reads (Redis); without it
  images stay data URLs.
- image-to-video: the runner's frames become one H.264 MP4, answered as an image response.
"""

from __future__ import annotations

import base64
import io
import secrets
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline

from kubepeer.livepeer.capabilities import Pipeline

RESULT_SECONDS = 600  # go-livepeer's aiWorkerResultsTimeout
MP4_BITRATE = 6_000_000
DEFAULT_FPS = 7
DEFAULT_I2V_WIDTH, DEFAULT_I2V_HEIGHT = 1024, 576

MEDIA = {"url", "seed", "nsfw"}


def _only(body: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k in keys}


def gateway_fields(pipeline: Pipeline, body: dict[str, Any]) -> dict[str, Any]:
    match pipeline:
        case (
            Pipeline.TEXT_TO_IMAGE
            | Pipeline.IMAGE_TO_IMAGE
            | Pipeline.UPSCALE
            | Pipeline.IMAGE_TO_VIDEO
        ):
            return {"images": [_only(i, MEDIA) for i in body.get("images", [])]}
        case Pipeline.AUDIO_TO_TEXT:
            chunks = [_only(c, {"timestamp", "text"}) for c in body.get("chunks", [])]
            return {"text": body.get("text", ""), "chunks": chunks}
        case Pipeline.SEGMENT_ANYTHING_2:
            return _only(body, {"masks", "scores", "logits"})
        case Pipeline.IMAGE_TO_TEXT:
            return _only(body, {"text"})
        case Pipeline.TEXT_TO_SPEECH:
            return {"audio": _only(body.get("audio", {}), {"url"})}
        case Pipeline.LLM:
            return _only(body, {"id", "model", "created", "usage", "choices"})
    return body


def split_data_url(url: str) -> tuple[str, bytes] | None:
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, data = url[5:].split(";base64,", 1)
    return head or "application/octet-stream", base64.b64decode(data)


EXTENSIONS = {"image/png": "png", "audio/wav": "wav", "video/mp4": "mp4", "image/jpeg": "jpg"}


class ResultStore:
    """Result files in Redis with an expiry: `kubepeer:result:{requestID}/{name}`. A job's
    files are written on the pipeline that carries its fee (`stage`), sent before its reply
    goes out, so a gateway never asks for a file not yet there."""

    def __init__(self, redis: AsyncRedis, ttl: int = RESULT_SECONDS) -> None:
        self.redis = redis
        self.ttl = ttl

    def stage(self, pipe: AsyncPipeline, request_id: str, content_type: str, data: bytes) -> str:
        """Queue a file on `pipe`; returns its name."""
        name = f"{secrets.token_hex(8)}.{EXTENSIONS.get(content_type, 'bin')}"
        key = f"kubepeer:result:{request_id}/{name}"
        pipe.hset(key, mapping={"type": content_type, "data": data})
        pipe.expire(key, self.ttl)
        return name

    async def get(self, request_id: str, name: str) -> tuple[str, bytes] | None:
        raw = await self.redis.hgetall(f"kubepeer:result:{request_id}/{name}")
        if not raw:
            return None
        return raw[b"type"].decode(), raw[b"data"]


def frames_to_mp4(frames: list[bytes], fps: int, width: int, height: int) -> bytes:
    """One H.264 MP4 of the runner's PNG frames at the request's size and rate."""
    import av
    from PIL import Image

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = MP4_BITRATE
        for data in frames:
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((width, height))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _even(value: int) -> int:
    return value + (value % 2)  # yuv420p wants even sides


def shape_reply(
    pipeline: Pipeline,
    body: dict[str, Any],
    request_fields: dict[str, Any],
    store: Callable[[str, bytes], str] | None,
) -> dict[str, Any]:
    """The gateway's reply; `store(content_type, data) -> url` when results go out as URLs."""
    if pipeline is Pipeline.IMAGE_TO_VIDEO:
        body = _video_reply(body, request_fields, store)
    reply = gateway_fields(pipeline, body)
    if store is None:
        return reply
    for media in reply.get("images", []):
        media["url"] = _stored(media.get("url", ""), store)
    if "audio" in reply:
        reply["audio"]["url"] = _stored(reply["audio"].get("url", ""), store)
    return reply


def _stored(url: str, store: Callable[[str, bytes], str]) -> str:
    parsed = split_data_url(url)
    return store(*parsed) if parsed else url


def _video_reply(
    body: dict[str, Any], fields: dict[str, Any], store: Callable[[str, bytes], str] | None
) -> dict[str, Any]:
    [frames, *_] = body.get("frames") or [[]]
    pngs = [p[1] for f in frames if (p := split_data_url(f.get("url", "")))]
    width = _even(int(fields.get("width") or DEFAULT_I2V_WIDTH))
    height = _even(int(fields.get("height") or DEFAULT_I2V_HEIGHT))
    fps = int(fields.get("fps") or DEFAULT_FPS)
    mp4 = frames_to_mp4(pngs, fps, width, height)
    url = (
        store("video/mp4", mp4)
        if store
        else "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    )
    first = frames[0] if frames else {}
    return {
        "images": [{"url": url, "seed": first.get("seed", 0), "nsfw": first.get("nsfw", False)}]
    }
