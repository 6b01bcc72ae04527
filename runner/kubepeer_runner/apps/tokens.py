"""tokens: a single-shot SSE app, the shape of an LLM's streamed answer. `POST /v1/stream`
with `{"prompt": "...", "max_tokens": 16, "delay_ms": 50}` streams one event per token
(`data: {"index": i, "token": "..."}`) as each is made, then `data: [DONE]`. The tokens are
the prompt's words, cycled: no model, so the stream itself is what is served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

MAX_TOKENS = 4096


class StreamRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=65536)
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS)
    delay_ms: int = Field(default=50, ge=0, le=10_000)


def create_app() -> FastAPI:
    app = FastAPI(title="tokens", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "OK"}

    @app.post("/v1/stream")
    async def stream(request: StreamRequest) -> StreamingResponse:
        words = request.prompt.split() or [request.prompt]

        async def events() -> AsyncIterator[bytes]:
            for index in range(request.max_tokens):
                if index and request.delay_ms:
                    await asyncio.sleep(request.delay_ms / 1000)
                token = words[index % len(words)]
                yield f"data: {json.dumps({'index': index, 'token': token})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app
