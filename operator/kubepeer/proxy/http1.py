"""Batch jobs over HTTP/1.1, without the ASGI server's per-request machinery.

A gateway's batch job is the proxy's hot path: one POST with a small body, one JSON answer.
Through uvicorn and ASGI, the server's share of each cost more than the job's own handling
(hack/bench/proxy.py). So the listener's HTTP/1.1 connections start on `LeanJobs`, which
serves a request itself when it is plainly a job: `POST /<batch pipeline> HTTP/1.1` with one
Content-Length up to `body_limit` and none of Transfer-Encoding, Expect or Upgrade. It parses
the head, starts the handler with the target, the headers, the whole body and a `respond`
callback, and writes the `Reply` it is given in one piece (chunked when streamed: llm). The
handler answers when it can: at once, from a callback, or from a task of its own; nothing
here needs a task or a future per job. At the first request that is anything
else, the connection moves to uvicorn's own HTTP/1.1 protocol for good, with every byte it has
not used, so each other route keeps uvicorn's full HTTP handling (trickle's streamed
bodies, disconnects, its 4xx for malformed requests) and the ASGI app. HTTP/2 never comes here.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger("kubepeer.proxy")

MAX_HEAD = 16 * 1024  # a job's head is a few hundred bytes; a larger one is uvicorn's to judge
HIGH_WATER = 64 * 1024  # bytes of a pipelined next request read ahead of its turn
# Header lines, each `token: value` with no control bytes in the value but tab (CR is one, so
# no line hides a bare CR or LF), checked in one pass over the whole block.
_FIELD = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*"
_FIELDS = re.compile(_FIELD + rb"(?:\r\n" + _FIELD + rb")*")
_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only (str.isdigit takes "²"), < 2**63
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


# Gives a request its reply; called once per request.
Respond = Callable[[Reply], None]
# Starts a job: (target, headers, body, respond); headers as `Head` has them. It calls
# `respond` exactly once, at once or later. If it raises without having called it, the
# request is answered with a 500 (and a later call is ignored).
Handler = Callable[[str, dict[str, str], bytes, Respond], None]


@dataclass(slots=True)
class Head:
    """A plain job's target, headers, body length and Connection: close. Headers by
    lowercased name, latin-1 text; of a repeated one the first, as Go's Header.Get reads."""

    target: str
    headers: dict[str, str]
    length: int
    close: bool


def parse_head(head: bytes, paths: frozenset[str]) -> Head | None:
    """The head (without its blank line) of a plain job, or None for anything else: another
    method, path or version, a header line that is not `token: value`, control bytes, no,
    a repeated or a malformed Content-Length, or Transfer-Encoding, Expect or Upgrade (a
    body not yet whole, or a protocol of uvicorn's to handle)."""
    line_end = head.find(b"\r\n")  # (no header line: no Content-Length either)
    if line_end < 0 or not _FIELDS.fullmatch(head, line_end + 2):
        return None
    request_line, _, fields = head.decode("latin-1").partition("\r\n")
    method, _, rest = request_line.partition(" ")
    target, _, version = rest.partition(" ")
    if method != "POST" or version != "HTTP/1.1" or target not in paths:
        return None
    headers: dict[str, str] = {}
    length = None
    close = False
    for line in fields.split("\r\n"):
        name, _, value = line.partition(":")
        name, value = name.lower(), value.strip(" \t")
        if name == "content-length":
            if length is not None or not _LENGTH.fullmatch(value):
                return None
            length = int(value)
        elif name in ("transfer-encoding", "expect", "upgrade"):
            return None
        elif name == "connection":
            close = "close" in value.lower()
        headers.setdefault(name, value)
    return None if length is None else Head(target, headers, length, close)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def listener(paths: Iterable[str], body_limit: int, handler: Handler,
             read_timeout: float) -> type[asyncio.Protocol]:  # fmt: skip
    """The listener's protocol for uvicorn (`uvicorn.Config(http=...)`): each connection
    goes to zttp's HTTP/2 protocol when it speaks HTTP/2 (ALPN h2 over TLS, the preface in
    plaintext), else to LeanJobs for these paths, bodies up to `body_limit` bytes, served
    by `handler`, each request's head and body whole within `read_timeout` seconds; LeanJobs
    hands anything else to zttp's HTTP/1.1 protocol. (uvicorn is imported here, not by the
    module: app.py needs only `Reply`.)"""
    from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol
    from uvicorn.protocols.http.zttp_impl import ZttpProtocol

    lean = (ZttpProtocol, frozenset(paths), body_limit, handler, read_timeout)

    class Listener(asyncio.Protocol):
        # What uvicorn.Config offers over TLS (it reads this attribute of its protocol).
        alpn_protocols: ClassVar[list[str]] = ["h2", "http/1.1"]

        # (uvicorn also passes its loop, `_loop`: ours is the running one)
        def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                     _loop: Any = None) -> None:  # fmt: skip
            self.config, self.server_state, self.app_state = config, server_state, app_state
            self.transport: asyncio.Transport = None  # type: ignore[assignment]
            self.buffer = b""
            self.idle: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self._give(ssl_object.selected_alpn_protocol() == "h2")
                return
            self.server_state.connections.add(self)  # (shut down with the server)
            self.idle = asyncio.get_running_loop().call_later(
                self.config.timeout_keep_alive, self.transport.close)  # fmt: skip

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if len(self.buffer) < len(HTTP2_PREFACE) and HTTP2_PREFACE.startswith(self.buffer):
                return  # maybe the h2c preface: wait for the rest of it
            self._give(self.buffer.startswith(HTTP2_PREFACE))

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()

        def eof_received(self) -> None:
            pass

        def shutdown(self) -> None:
            self.transport.close()

        def _forget(self) -> None:
            self.server_state.connections.discard(self)
            if self.idle is not None:
                self.idle.cancel()
                self.idle = None

        def _give(self, http2: bool) -> None:
            self._forget()
            state = (self.config, self.server_state, self.app_state)
            protocol: asyncio.Protocol
            if http2:
                protocol = ZttpH2Protocol(
                    config=state[0], server_state=state[1], app_state=state[2]
                )
            else:
                protocol = LeanJobs(*state, *lean)
            _move(self.transport, protocol, self.buffer)
            self.buffer = b""

    return Listener


def _sent(reply: Reply) -> None:
    """The reply is out: its `after` runs (counts, the log line), whatever it raises."""
    try:
        reply.sent()
    except Exception:
        log.exception("recording a reply failed")


def _move(transport: asyncio.Transport, protocol: asyncio.Protocol, unread: bytes) -> None:
    """Give the connection to `protocol`, with the bytes read but not yet used."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if unread:
        protocol.data_received(unread)


class LeanJobs(asyncio.Protocol):
    """One HTTP/1.1 connection, while its requests are plain jobs (see the module)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 uvicorn: type[asyncio.Protocol], paths: frozenset[str], body_limit: int,
                 handler: Handler, read_timeout: float) -> None:  # fmt: skip
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.uvicorn = uvicorn  # the protocol a connection moves to (zttp's HTTP/1.1)
        self.paths, self.body_limit, self.handler = paths, body_limit, handler
        self.read_timeout = read_timeout
        # From a request's first byte until it is whole: past it, 408 and the end (Go's
        # ReadTimeout), so a head or body sent a byte at a time holds nothing for long.
        self.reading: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buffer = bytearray()
        self.head: Head | None = None  # the request whose body is being read
        self.busy = False  # a request is being answered
        self.responded = False  # ... and its handler has given the reply
        self.close_after = False  # ... and asked for Connection: close
        self.starting = False  # in _next's loop (a reply given at once returns to it)
        self.gone = False  # the client went away
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False  # close once the job in flight is answered
        self.paused = False
        self.idle: asyncio.TimerHandle | None = None  # the keep-alive timer
        self.idle_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        self._wait_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._stop_idle()
        self._stop_reading()
        self.gone = True
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
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
        if not self.busy:
            self.transport.close()
        else:
            self.closing = True

    # -- requests ------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the buffered requests, one at a time, as each is whole and the one before
        it answered; or give the connection to uvicorn. A loop, not a recursion: a reply
        given at once (a refusal) comes back here through `_answered`."""
        if self.starting:
            return
        self.starting = True
        try:
            while not self.busy and not self.transport.is_closing() and self._start():
                pass
        finally:
            self.starting = False

    def _start(self) -> bool:
        """Start the buffered request if it is whole: False when there is none yet, or the
        connection has gone to uvicorn."""
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if not b"POST /".startswith(self.buffer[:6]) or len(self.buffer) > MAX_HEAD:
                    self._hand_off()
                elif self.buffer:
                    self._read_the_rest()
                return False
            head = parse_head(bytes(self.buffer[:end]), self.paths)
            if head is None or head.length > self.body_limit:
                self._hand_off()
                return False
            self.head = head
            del self.buffer[: end + 4]
        if len(self.buffer) < self.head.length:
            self._read_the_rest()
            return False
        head, self.head = self.head, None
        self._stop_reading()  # whole: the next request's clock starts at its first byte
        body = bytes(self.buffer[: head.length])
        del self.buffer[: head.length]
        self.busy, self.responded, self.close_after = True, False, head.close
        try:
            self.handler(head.target, head.headers, body, self._respond)
        except Exception:
            log.exception("job failed")
            if not self.responded:
                self.close_after = True
                self._respond(Reply(500, b"text/plain; charset=utf-8", b"Internal Server Error"))
        return True

    def _hand_off(self) -> None:
        self._stop_idle()
        self._stop_reading()  # uvicorn's now (a body it reads for a job: read_body's timeout)
        self.server_state.connections.discard(self)
        if self.paused:
            self.transport.resume_reading()
        protocol = self.uvicorn(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        _move(self.transport, protocol, bytes(self.buffer))
        self.buffer.clear()

    def _respond(self, reply: Reply) -> None:
        if self.responded:  # the handler raised after answering, or answered twice
            log.error("a second reply to one request was dropped")
            return
        self.responded = True
        close = self.close_after or self.closing
        if reply.stream is not None:
            streaming = self.loop.create_task(self._stream(reply, close))
            self.server_state.tasks.add(streaming)
            streaming.add_done_callback(self.server_state.tasks.discard)
            return
        try:
            whole = self._write_whole(reply, close)
        finally:
            _sent(reply)
        self._answered(whole, close)

    async def _stream(self, reply: Reply, close: bool) -> None:
        try:
            whole = await self._write_stream(reply, close)
        except Exception:  # the stream broke (its runner died): the chunked body never ends
            log.exception("a streamed reply failed")
            whole = False
        finally:
            _sent(reply)
        self._answered(whole, close)

    def _answered(self, whole: bool, close: bool) -> None:
        """The reply is out (`whole`: all of it): the next request, or the end."""
        self.busy = False
        if not whole or close or self.closing or self.transport.is_closing():
            self.transport.close()
            return
        self._wait_idle()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._next()

    def _head_bytes(self, reply: Reply, close: bool) -> bytearray:
        status = reply.status
        head = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")))
        for name, value in (*reply.headers, *self.server_state.default_headers):
            head += b"%s: %s\r\n" % (name, value)
        if reply.stream is None:
            head += b"content-length: %d\r\n" % len(reply.body)
        else:
            head += b"transfer-encoding: chunked\r\n"
        if close:
            head += b"connection: close\r\n"
        head += b"\r\n"
        return head

    def _write_whole(self, reply: Reply, close: bool) -> bool:
        """Write a whole reply; False when the client has left."""
        if self.gone:
            return False
        head = self._head_bytes(reply, close)
        head += reply.body
        self.transport.write(head)
        return True

    async def _write_stream(self, reply: Reply, close: bool) -> bool:
        """Write a streamed reply chunk by chunk; False when the client left before its end."""
        stream = reply.stream
        assert stream is not None
        try:
            if self.gone:
                return False
            self.transport.write(self._head_bytes(reply, close))
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
        """Idle from now: closed after the keep-alive timeout unless a request starts. One
        timer for the connection, pushed on when it fires early, not one per request."""
        self.idle_since = self.loop.time()
        if self.idle is None:
            self.idle = self.loop.call_at(
                self.idle_since + self.config.timeout_keep_alive, self._idle_check
            )

    def _idle_check(self) -> None:
        self.idle = None
        if self.busy or self.head is not None:
            return  # a request is in: its reply starts the wait again
        due = self.idle_since + self.config.timeout_keep_alive
        if self.loop.time() >= due:
            self.transport.close()
        else:
            self.idle = self.loop.call_at(due, self._idle_check)

    def _read_the_rest(self) -> None:
        """A request has begun and is not whole: its clock runs (from its first byte)."""
        if self.reading is None:
            self.reading = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self.reading = None
        if self.busy or self.transport.is_closing():
            return
        self.buffer.clear()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; "
                             b"charset=utf-8\r\ncontent-length: 30\r\nconnection: close\r\n"
                             b"\r\nrequest not received in time\r\n")  # fmt: skip
        self.transport.close()

    def _stop_reading(self) -> None:
        if self.reading is not None:
            self.reading.cancel()
            self.reading = None

    def _stop_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None


def header_map(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers with lowercased names (as ASGI and http1.py give them) by name; of a repeated
    one the first, as Go's Header.Get and starlette's Headers.get read it."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(raw)}
