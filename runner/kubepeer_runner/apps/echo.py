"""echo: a persistent Live Runner app. Within a session it:

- `POST /start` makes two trickle channels through the orchestrator (`in`, `out`, with the
  session's `Livepeer-Session-Control` and token, live-runner-wire.md 6) and answers their
  client URLs; from then on every segment published to `in` is written to `out` unchanged;
- `GET /ws` is a WebSocket that sends back each message it is sent;
- `POST /done` asks the orchestrator to end the session (the runner's stop, wire 4.3).

The channels are read and written at their `internal_url`, as go-livepeer's echo example
does; the client uses `url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

from kubepeer_runner.live.trickle import ChannelClosed, Publisher, Subscriber, open_session

log = logging.getLogger("kubepeer_runner.apps.echo")


class StartRequest(BaseModel):
    mime_type: str = Field(default="application/octet-stream", max_length=128)


def _session(request: Request) -> tuple[str, str, str]:
    """(session id, control URL, token) the orchestrator gave this request."""
    sid = request.headers.get("livepeer-session-id", "")
    control = request.headers.get("livepeer-session-control", "")
    token = request.headers.get("livepeer-session-token", "")
    if not (sid and control and token):
        raise HTTPException(400, "not called through a Live Runner session: no session headers")
    return sid, control.rstrip("/"), token


async def _echo(http: aiohttp.ClientSession, source: str, sink: str) -> None:
    reader, writer = Subscriber(http, source), Publisher(http, sink)
    try:
        while True:
            await writer.write(await reader.next())
    except ChannelClosed:
        pass
    finally:
        await writer.close()


def create_app() -> FastAPI:
    echoes: dict[str, asyncio.Task[None]] = {}  # session id -> its echo loop
    http: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for task in echoes.values():
            task.cancel()
        if "session" in http:
            await http["session"].close()

    app = FastAPI(title="echo", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip

    def client() -> aiohttp.ClientSession:
        if "session" not in http:
            http["session"] = open_session()
        return http["session"]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "OK"}

    @app.post("/start")
    async def start(body: StartRequest, request: Request) -> dict[str, str]:
        sid, control, token = _session(request)
        wanted = {"channels": [{"name": "in", "mime_type": body.mime_type},
                               {"name": "out", "mime_type": body.mime_type}]}  # fmt: skip
        async with client().post(f"{control}/channels", json=wanted,
                                 headers={"Livepeer-Session-Token": token}) as answer:  # fmt: skip
            if answer.status != 200:
                raise HTTPException(502, f"channels refused: {answer.status} "
                                         f"{(await answer.text()).strip()}")  # fmt: skip
            made = {c["name"]: c for c in (await answer.json())["channels"]}
        if sid not in echoes or echoes[sid].done():
            loop = _echo(client(), made["in"]["internal_url"], made["out"]["internal_url"])
            echoes[sid] = asyncio.create_task(loop)
        return {"in": made["in"]["url"], "out": made["out"]["url"]}

    @app.websocket("/ws")
    async def echo_messages(socket: WebSocket) -> None:
        await socket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await socket.send_text(message["text"])
                elif message.get("bytes") is not None:
                    await socket.send_bytes(message["bytes"])

    @app.post("/done")
    async def done(request: Request) -> dict[str, int]:
        _, control, token = _session(request)
        async with client().post(f"{control}/stop",
                                 headers={"Livepeer-Session-Token": token}) as answer:  # fmt: skip
            return {"stop": answer.status}

    return app
