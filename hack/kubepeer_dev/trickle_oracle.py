#!/usr/bin/env python3
"""A minimal trickle server written from gateway-wire.md 5.2 alone (not from our runner's
client, nor from the proxy's server): the independent oracle the live runner's tests and
benchmark run against until they run against the proxy's own trickle server.

    trickle_oracle.py PORT   (channels under /ai/trickle/, created by POST /ai/trickle/{ch})

What it implements, as 5.2 states it: channels exist only once created (404 otherwise);
`POST /{ch}/{seq}` writes a segment whose bytes readers receive as they arrive, answering
with `Lp-Trickle-Seq`; `GET /{ch}/{seq}` streams a segment until its writer finishes it,
with `Lp-Trickle-Seq`, `Lp-Trickle-Latest` and the channel's Content-Type; seq -1 is the
next segment to be written (reading or writing), -2 the current one; 470 when the channel
exists but seq has left its 5-segment ring; `DELETE /{ch}` closes the channel and its
readers see `Lp-Trickle-Closed: terminated`.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiohttp import web

RING = 5


class Segment:
    def __init__(self) -> None:
        self.data = bytearray()
        self.done = False
        self.changed = asyncio.Event()

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Channel:
    def __init__(self, mime: str) -> None:
        self.mime = mime
        self.segments: dict[int, Segment] = {}
        self.latest = -1  # the newest segment a writer has started
        self.closed = False
        self.changed = asyncio.Event()

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def segment(self, seq: int) -> Segment:
        if seq not in self.segments:
            self.segments[seq] = Segment()
            self.latest = max(self.latest, seq)
            for old in [s for s in self.segments if s <= self.latest - RING]:
                del self.segments[old]
            self.touch()
        return self.segments[seq]


channels: dict[str, Channel] = {}


def headers(channel: Channel, seq: int) -> dict[str, str]:
    return {"Lp-Trickle-Seq": str(seq), "Lp-Trickle-Latest": str(channel.latest),
            "Content-Type": channel.mime}  # fmt: skip


async def create(request: web.Request) -> web.Response:
    name = request.match_info["ch"]
    channels[name] = Channel(request.headers.get("Content-Type", "video/MP2T"))
    return web.Response(text="created")


async def close(request: web.Request) -> web.Response:
    channel = channels.pop(request.match_info["ch"], None)
    if channel is None:
        return web.Response(status=404, text="channel not found")
    channel.closed = True
    channel.touch()
    for segment in channel.segments.values():
        segment.touch()
    return web.Response(text="closed")


def addressed(request: web.Request) -> tuple[Channel | None, int]:
    """The channel and the segment a request names (-1: the next one, -2: the current)."""
    channel = channels.get(request.match_info["ch"])
    seq = int(request.match_info["seq"])
    if channel is not None and seq == -1:
        seq = channel.latest + 1
    elif channel is not None and seq == -2:
        seq = max(channel.latest, 0)
    return channel, seq


async def publish(request: web.Request) -> web.Response:
    channel, seq = addressed(request)
    if channel is None:
        return web.Response(status=404, text="channel not found")
    segment = channel.segment(seq)
    async for chunk in request.content.iter_any():
        segment.data += chunk
        segment.touch()
    segment.done = True
    segment.touch()
    return web.Response(headers={"Lp-Trickle-Seq": str(seq)})


async def subscribe(request: web.Request) -> web.StreamResponse:
    channel, seq = addressed(request)
    if channel is None:
        return web.Response(status=404, text="channel not found")
    if seq <= channel.latest - RING:
        return web.Response(status=470, headers=headers(channel, seq), text="seq not available")
    while seq not in channel.segments and not channel.closed:
        await channel.changed.wait()
    if channel.closed and seq not in channel.segments:
        return web.Response(headers={**headers(channel, seq), "Lp-Trickle-Closed": "terminated"})
    segment = channel.segments[seq]
    response = web.StreamResponse(headers=headers(channel, seq))
    try:
        await response.prepare(request)
        sent = 0
        while True:
            if sent < len(segment.data):
                chunk = bytes(segment.data[sent:])
                sent += len(chunk)
                await response.write(chunk)
                continue
            if segment.done or channel.closed:
                break
            await segment.changed.wait()
        await response.write_eof()
    except ConnectionError:
        pass  # the reader went away: nothing to tell it
    return response


def app() -> web.Application:
    application = web.Application(client_max_size=1 << 30)
    application.router.add_post("/ai/trickle/{ch}", create)
    application.router.add_delete("/ai/trickle/{ch}", close)
    application.router.add_post("/ai/trickle/{ch}/{seq:-?[0-9]+}", publish)
    application.router.add_get("/ai/trickle/{ch}/{seq:-?[0-9]+}", subscribe)
    return application


@dataclass
class Read:
    status: int
    headers: httpx.Headers
    body: bytes


class OracleServer:
    """The oracle as a process on a loopback port, and a plain HTTP client for it (what a
    gateway does with its channels: create, publish, read, close)."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}/ai/trickle"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubepeer_dev.trickle_oracle", str(port)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(timeout=httpx.Timeout(120, connect=5))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.http.delete(f"{self.base}/probe")
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"trickle oracle did not start:\n{log.read_text()}")

    def url(self, channel: str) -> str:
        return f"{self.base}/{channel}"

    def create(self, *channels: str) -> None:
        for channel in channels:
            self.http.post(self.url(channel)).raise_for_status()

    def publish(self, channel: str, seq: int, data: bytes) -> None:
        self.http.post(f"{self.url(channel)}/{seq}", content=data).raise_for_status()

    def read(self, channel: str, seq: int, timeout: float = 120) -> Read:
        response = self.http.get(f"{self.url(channel)}/{seq}", timeout=timeout)
        return Read(response.status_code, response.headers, response.content)

    def close(self, channel: str) -> None:
        self.http.delete(self.url(channel))

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # aiohttp waits for readers still parked
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
