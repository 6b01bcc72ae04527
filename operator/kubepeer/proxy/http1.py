"""Batch jobs over HTTP/1.1, without the ASGI server's per-request machinery.

A gateway's batch job is the proxy's hot path: one POST with a small body, one JSON answer.
Through uvicorn and ASGI, the server's share of each cost more than the job's own handling
(hack/bench/proxy.py). So the listener's HTTP/1.1 connections start on `LeanJobs`, which
serves a request itself when it is plainly a job: `POST /<batch pipeline> HTTP/1.1` with one
Content-Length up to `body_limit` and none of Transfer-Encoding, Expect or Upgrade. It parses
the head, calls the handler with the target, the headers and the whole body, and writes the
`Reply` in one piece (chunked when streamed: llm). At the first request that is anything
else, the connection moves to uvicorn's own HTTP/1.1 protocol for good, with every byte it has
not used, so each other route keeps uvicorn's full HTTP handling (trickle's 100 Continue,
disconnects, its 4xx for malformed requests) and the ASGI app. HTTP/2 never comes here.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger("kubepeer.proxy")

MAX_HEAD = 16 * 1024  # a job's head is a few hundred bytes; a larger one is uvicorn's to judge
HIGH_WATER = 64 * 1024  # bytes of a pipelined next request read ahead of its turn
# Header lines, each `token: value` with no control bytes in the value but tab (CR is one, so
# no line hides a bare CR or LF), checked in one pass over the whole block.
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


class Reply:
    """A job's answer: a whole body, or a `stream` of pieces (llm SSE). `sent()` is called
    by the server once the answer is out (or the client gone), and calls `after(status)`."""

    __slots__ = ("after", "body", "headers", "status", "stream")

    def __init__(self, status: int, content_type: bytes, body: bytes = b"",
                 stream: AsyncIterator[bytes] | None = None) -> None:  # fmt: skip
        self.status, self.body, self.stream = status, body, stream
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", content_type)]
        self.after: Callable[[int], None] | None = None

    def sent(self) -> None:
        after, self.after = self.after, None
        if after is not None:
            after(self.status)


# (target, headers with lowercased names, body) -> the reply
Handler = Callable[[bytes, list[tuple[bytes, bytes]], bytes], Awaitable[Reply]]


@dataclass(slots=True)
class Head:
    """A plain job's target, headers (names lowercased), body length and Connection: close."""

    target: bytes
    headers: list[tuple[bytes, bytes]]
    length: int
    close: bool


def parse_head(head: bytes, paths: frozenset[bytes]) -> Head | None:
    """The head (without its blank line) of a plain job, or None for anything else: another
    method, path or version, a header line that is not `token: value`, control bytes, no
    or a repeated Content-Length, or a header that asks for more than a buffered body."""
    request_line, _, fields = head.partition(b"\r\n")
    method, _, rest = request_line.partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"POST" or version != b"HTTP/1.1" or target not in paths:
        return None
    if not _FIELDS.fullmatch(fields + b"\r\n"):
        return None
    headers = []
    length = None
    close = False
    for line in fields.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        elif name == b"connection":
            close = b"close" in value.lower()
        headers.append((name, value))
    return None if length is None else Head(target, headers, length, close)


def listener(paths: Iterable[str], body_limit: int, handler: Handler) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 + HTTP/2 dispatcher, with HTTP/1.1 connections starting on
    LeanJobs for these paths, bodies up to `body_limit` bytes, served by `handler`. (uvicorn
    is imported here, not by the module: app.py needs only `Reply`.)"""
    from uvicorn.protocols.http.auto_zttp_impl import AutoZttpProtocol
    from uvicorn.protocols.http.zttp_impl import ZttpProtocol

    class Listener(AutoZttpProtocol):
        lean: ClassVar[tuple[type[asyncio.Protocol], frozenset[bytes], int, Handler]] = (
            ZttpProtocol, frozenset(p.encode() for p in paths), body_limit, handler)  # fmt: skip

        def _switch(self, http2: bool, initial_data: bytes = b"") -> None:
            if http2:
                super()._switch(http2, initial_data)
                return
            protocol = LeanJobs(self.config, self.server_state, self.app_state, *self.lean)
            _move(self.transport, protocol, initial_data)

    return Listener


def _move(transport: asyncio.Transport, protocol: asyncio.Protocol, unread: bytes) -> None:
    """Give the connection to `protocol`, with the bytes read but not yet used."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if unread:
        protocol.data_received(unread)


class LeanJobs(asyncio.Protocol):
    """One HTTP/1.1 connection, while its requests are plain jobs (see the module)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 uvicorn: type[asyncio.Protocol], paths: frozenset[bytes], body_limit: int,
                 handler: Handler) -> None:  # fmt: skip
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.uvicorn = uvicorn  # the protocol a connection moves to (zttp's HTTP/1.1)
        self.paths, self.body_limit, self.handler = paths, body_limit, handler
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buffer = bytearray()
        self.head: Head | None = None  # the request whose body is being read
        self.job: asyncio.Task[None] | None = None  # the request being answered
        self.gone = False  # the client went away
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False  # close once the job in flight is answered
        self.paused = False
        self.idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        self._wait_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._stop_idle()
        self.gone = True
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.job is None:
            self._next()
        elif len(self.buffer) > HIGH_WATER and not self.paused:
            self.paused = True  # a pipelined request waits for its turn
            self.transport.pause_reading()

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def shutdown(self) -> None:
        """uvicorn's graceful stop: close now if idle, else after the job in flight."""
        if self.job is None:
            self.transport.close()
        else:
            self.closing = True

    # -- requests ------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the buffered request once it is whole, or give the connection to uvicorn."""
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if not b"POST /".startswith(self.buffer[:6]) or len(self.buffer) > MAX_HEAD:
                    self._hand_off()
                return
            head = parse_head(bytes(self.buffer[:end]), self.paths)
            if head is None or head.length > self.body_limit:
                self._hand_off()
                return
            self._stop_idle()
            self.head = head
            del self.buffer[: end + 4]
        if len(self.buffer) < self.head.length:
            return
        head, self.head = self.head, None
        body = bytes(self.buffer[: head.length])
        del self.buffer[: head.length]
        self.job = self.loop.create_task(self._serve(head, body))
        self.server_state.tasks.add(self.job)
        self.job.add_done_callback(self.server_state.tasks.discard)

    def _hand_off(self) -> None:
        self._stop_idle()
        self.server_state.connections.discard(self)
        if self.paused:
            self.transport.resume_reading()
        protocol = self.uvicorn(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.app_state,
            _loop=self.loop,
        )  # fmt: skip
        _move(self.transport, protocol, bytes(self.buffer))
        self.buffer.clear()

    async def _serve(self, head: Head, body: bytes) -> None:
        close = head.close
        try:
            reply = await self.handler(head.target, head.headers, body)
        except Exception:
            log.exception("job failed")
            reply = Reply(500, b"text/plain; charset=utf-8", b"Internal Server Error")
            close = True
        try:
            whole = await self._write(reply, close or self.closing)
        finally:
            reply.sent()
        self.job = None
        if not whole or close or self.closing or self.transport.is_closing():
            self.transport.close()
            return
        self._wait_idle()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._next()

    async def _write(self, reply: Reply, close: bool) -> bool:
        """Write the reply; False when it could not be written whole (the client left)."""
        status = reply.status
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        for name, value in (*reply.headers, *self.server_state.default_headers):
            head.append(b"%s: %s\r\n" % (name, value))
        stream = reply.stream
        if stream is None:
            head.append(b"content-length: %d\r\n" % len(reply.body))
        else:
            head.append(b"transfer-encoding: chunked\r\n")
        if close:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if self.gone:
            return False
        if stream is None:
            self.transport.write(b"".join(head) + reply.body)
            return True
        self.transport.write(b"".join(head))
        try:
            async for piece in stream:  # a client gone is noticed at the next piece
                if self.gone:
                    return False
                if piece:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await self.writable.wait()  # a slow reader holds the stream back
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # its own cleanup, now
        if self.gone:
            return False
        self.transport.write(b"0\r\n\r\n")
        return True

    # -- keep-alive ----------------------------------------------------------------------
    def _wait_idle(self) -> None:
        self._stop_idle()
        self.idle = self.loop.call_later(self.config.timeout_keep_alive, self.transport.close)

    def _stop_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
