"""A trickle client (gateway-wire.md 5.2): read and write the segments of one channel.

`GET {channel}/{seq}` streams segment seq until its publisher finishes it; 470 means the
channel exists but seq has left its ring (jump to `Lp-Trickle-Latest`); 404 or
`Lp-Trickle-Closed` means the channel is gone. `POST {channel}/{seq}` writes segment seq;
`DELETE {channel}` closes the channel.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("kubepeer_runner.live")

SEQ_UNAVAILABLE = 470
RETRY_SECONDS = 0.5


class ChannelClosed(Exception):
    """The channel is gone (404 or Lp-Trickle-Closed): the stream is over."""


def open_session() -> aiohttp.ClientSession:
    # Trickle URLs point at the orchestrator's own server, which go-livepeer's runners
    # reach without verifying its certificate (gateway-wire.md 5.2, TLS).
    connector = aiohttp.TCPConnector(ssl=False, limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


class Subscriber:
    """Reads segments of a channel in order, from `start` (0: the channel's first)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, start: int = 0) -> None:
        self.session, self.url, self.seq = session, url.rstrip("/"), start
        self.skipped = 0

    async def next(self) -> bytes:
        """The next segment's bytes, once its publisher has finished it.

        Raises ChannelClosed at the end of the stream. A server that cannot be reached is
        tried again every RETRY_SECONDS (a proxy replica restarting): the caller bounds
        the wait."""
        while True:
            try:
                return await self._read()
            except aiohttp.ClientConnectionError as exc:
                log.info("%s/%d: %s; trying again", self.url, self.seq, exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def _read(self) -> bytes:
        while True:
            async with self.session.get(f"{self.url}/{self.seq}") as response:
                if response.status == 404 or response.headers.get("Lp-Trickle-Closed"):
                    raise ChannelClosed(f"{self.url} closed ({response.status})")
                if response.status == SEQ_UNAVAILABLE:
                    latest = int(response.headers.get("Lp-Trickle-Latest", self.seq))
                    # Too far behind: jump to the newest segment (never backwards).
                    jump = max(latest, self.seq + 1)
                    self.skipped += jump - self.seq
                    log.info("%s: segment %d is gone, skipping to %d", self.url, self.seq, jump)
                    self.seq = jump
                    continue
                if response.status != 200:
                    raise ChannelClosed(f"{self.url}/{self.seq} answered {response.status}")
                body = await response.read()
                self.seq = int(response.headers.get("Lp-Trickle-Seq", self.seq)) + 1
                return body


class Publisher:
    """Writes segments of a channel in order, from seq 0."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url, self.seq = session, url.rstrip("/"), 0

    async def write(self, data: bytes) -> None:
        async with self.session.post(f"{self.url}/{self.seq}", data=data) as response:
            await response.read()
            if response.status == 404:
                raise ChannelClosed(f"{self.url} closed (404)")
            if response.status >= 400:
                raise ChannelClosed(f"{self.url}/{self.seq} answered {response.status}")
        self.seq += 1

    async def close(self) -> None:
        """Close the channel: its readers see the end of the stream."""
        try:
            async with self.session.delete(self.url) as response:
                await response.read()
        except aiohttp.ClientError as exc:
            log.info("closing %s: %s", self.url, exc)
