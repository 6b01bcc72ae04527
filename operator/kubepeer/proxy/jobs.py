"""A batch job's way through the front door, in go-livepeer's check order (gateway-wire 2.2).

0. body read (413 past the limit) and decoded (400)
1. Livepeer-Payment decoded (402)
2. Livepeer-Segment credentials (403)
3. billed units (400)
4. a slot on a runner, or a hold while the model wakes (503 `insufficient capacity`)
5. the payment credited (400)
6. the balance covers a ticket's EV (400 `Insufficient balance`)
7. the runner answers (500 `<pipeline> container returned <status>: <msg>`)
8. the fee debited, only on success
Error bodies are plain text with a newline, like Go's http.Error: gateways match the text.

A body larger than LARGE_BODY (or of unknown length) is read only after steps 1 and 2 pass
on the headers alone, and every request must arrive whole within READ_TIMEOUT (408): what
cannot pay never makes the proxy hold much memory, nor hold it for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import Pipeline

BATCH_PIPELINES = tuple(p for p in Pipeline if p is not Pipeline.LIVE_VIDEO_TO_VIDEO)
JSON_PIPELINES = {Pipeline.TEXT_TO_IMAGE, Pipeline.LLM, Pipeline.TEXT_TO_SPEECH,
                  Pipeline.LIVE_VIDEO_TO_VIDEO}  # fmt: skip
INSUFFICIENT_CAPACITY = "insufficient capacity"  # 503: no slot, and none worth waiting for
READ_TIMEOUT = 60.0  # seconds for a request's head and body to arrive whole (Go: ReadTimeout)
READ_IDLE_TIMEOUT = 15.0  # seconds a body being read may send nothing
# Bodies up to this size are read before anything else, in go-livepeer's order (0 before 1
# and 2); a larger one only once the credentials in the headers pass (steps 1 and 2 first).
LARGE_BODY = 1024 * 1024
# 503 while Redis (balances, nonces, results) is out of reach. Gateways act on the text alone
# (gateway-wire 2.4): with "insufficient capacity" in it they try another orchestrator and do
# not suspend this one, which is right for an outage of seconds.
STORE_UNAVAILABLE = f"{INSUFFICIENT_CAPACITY}: the orchestrator's store is unavailable"


class JobRefused(Exception):
    """Ends a job with `status` and the plain-text `text`."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class JobRequest:
    pipeline: Pipeline
    body: bytes
    content_type: str
    fields: dict[str, Any]

    @property
    def model_id(self) -> str:
        key = "model" if self.pipeline is Pipeline.LLM else "model_id"
        return str(self.fields.get(key) or "")

    @property
    def streams(self) -> bool:
        return self.pipeline is Pipeline.LLM and bool(self.fields.get("stream"))


async def read_body(request: Request, limit: int, timeout: float = READ_TIMEOUT,
                    idle: float = READ_IDLE_TIMEOUT) -> bytes:  # fmt: skip
    """The body, refused with 413 as soon as it passes `limit` (never buffered beyond it),
    and with 408 unless it is whole within `timeout` seconds (Go's ReadTimeout) with no
    pause longer than `idle` seconds between its pieces."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise JobRefused(413, f"request body exceeds the limit of {limit} bytes")
    body = bytearray()
    pieces = request.stream()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(pieces), idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise JobRefused(408, f"request body stalled: nothing for {idle:g} s") from None
                body += chunk
                if len(body) > limit:
                    raise JobRefused(413, f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise JobRefused(408, f"request body not received within {timeout:g} s") from None
    finally:
        if len(body) > limit:
            # A refused body is freed now: the refusal's traceback keeps this frame alive
            # until the garbage collector runs (64 MB a refusal, measured).
            body.clear()
    return bytes(body)


def declared_large(headers: Mapping[str, str]) -> bool:
    """Whether a request's body may be larger than LARGE_BODY: declared so, or unknown (chunked,
    or an HTTP/2 stream without content-length). Such a body is read only after the request's
    credentials pass, so nobody who cannot pay makes us buffer it."""
    declared = headers.get("content-length", "")
    return not declared.isdigit() or int(declared) > LARGE_BODY


def decode_json(body: bytes) -> dict[str, Any]:
    """The fields of a JSON pipeline's body (400 unless it is a JSON object)."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8
        raise JobRefused(400, f"invalid JSON body: {exc}") from None
    if not isinstance(fields, dict):
        raise JobRefused(400, "the JSON body must be an object")
    return fields


async def decode_fields(pipeline: Pipeline, content_type: str, body: bytes) -> dict[str, Any]:
    if pipeline in JSON_PIPELINES:
        return decode_json(body)
    if not content_type.startswith("multipart/form-data"):
        raise JobRefused(400, f"{pipeline.value} takes multipart/form-data, got {content_type!r}")

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "headers": [(b"content-type", content_type.encode())],
    }
    try:
        form = await Request(scope, replay).form(max_part_size=len(body) + 1)
    except Exception as exc:  # multipart raises several types on a malformed body
        raise JobRefused(400, f"invalid multipart body: {exc}") from None
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        fields[name] = await value.read() if isinstance(value, UploadFile) else value
    return fields


def runner_error(pipeline: Pipeline, status: int, raw: bytes) -> str:
    """A runner's error answer as go-livepeer reports it (step 7); ai-runner's errors are
    {"detail": {"msg": ...}}."""
    try:
        detail = orjson.loads(raw).get("detail")
        message = detail.get("msg") if isinstance(detail, dict) else detail
    except (orjson.JSONDecodeError, AttributeError):  # (also a body that is not UTF-8)
        message = raw.decode(errors="replace").strip()
    return f"{pipeline.value} container returned {status}: {message}"


def segment_capabilities_model(seg: net_pb2.SegData) -> list[tuple[int, str]]:
    per = seg.capabilities.constraints.per_capability
    return [(cap, model) for cap, c in per.items() for model in c.models]
