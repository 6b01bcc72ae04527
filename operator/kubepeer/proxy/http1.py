"""Batch jobs over HTTP/1.1, without the ASGI server's per-request machinery.

A gateway's batch job is the proxy's hot path: one POST with a small body, one JSON answer.
uvicorn spends about as much CPU on each as the proxy's own handling of it
(hack/bench/proxy.py). So the listener's HTTP/1.1 connections start on `LeanJobs`, which
serves a request itself when it is plainly a job: `POST /<batch pipeline> HTTP/1.1` with one
Content-Length up to `body_limit` and none of Transfer-Encoding, Expect or Upgrade. It parses
the head, hands the same ASGI app the same scope uvicorn would, and writes the answer in one
piece (chunked when the app streams it: llm). At the first request that is anything else, the
connection moves to uvicorn's own HTTP/1.1 protocol for good, with every byte it has not used,
so each other route keeps uvicorn's full HTTP handling (trickle's 100 Continue, disconnects,
its 4xx for malformed requests). HTTP/2 connections never come here.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections.abc import Iterable
from typing import Any, ClassVar

from uvicorn.protocols.http.auto_zttp_impl import AutoZttpProtocol
from uvicorn.protocols.http.zttp_impl import ZttpProtocol
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

log = logging.getLogger("kubepeer.proxy")

MAX_HEAD = 16 * 1024  # a job's head is a few hundred bytes; a larger one is uvicorn's to judge
HIGH_WATER = 64 * 1024  # bytes of a pipelined next request read ahead of its turn
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_DISCONNECT = {"type": "http.disconnect"}


class Head:
    """A plain job's request line and headers, as ASGI wants them."""

    __slots__ = ("close", "headers", "length", "target")

    def __init__(self, target: bytes, headers: list[tuple[bytes, bytes]], length: int,
                 close: bool) -> None:  # fmt: skip
        self.target, self.headers, self.length, self.close = target, headers, length, close


def parse_head(head: bytes, paths: frozenset[bytes]) -> Head | None:
    """The head (without its blank line) of a plain job, or None for anything else: another
    method, path or version, a header line that is not `token: value`, control bytes, no
    or a repeated Content-Length, or a header that asks for more than a buffered body."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"POST" or version != b"HTTP/1.1" or target not in paths:
        return None
    headers = []
    length = None
    close = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            return None
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


def listener(paths: Iterable[str], body_limit: int) -> type[AutoZttpProtocol]:
    """uvicorn's HTTP/1.1 + HTTP/2 dispatcher, with HTTP/1.1 connections starting on
    LeanJobs for these paths and bodies up to `body_limit` bytes."""

    class Listener(AutoZttpProtocol):
        lean: ClassVar[tuple[frozenset[bytes], int]] = (
            frozenset(path.encode() for path in paths), body_limit)  # fmt: skip

        def _switch(self, http2: bool, initial_data: bytes = b"") -> None:
            if http2:
                super()._switch(http2, initial_data)
                return
            protocol = LeanJobs(self.config, self.server_state, self.app_state, *self.lean)
            self.transport.set_protocol(protocol)
            protocol.connection_made(self.transport)
            if initial_data:
                protocol.data_received(initial_data)

    return Listener


class LeanJobs(asyncio.Protocol):
    """One HTTP/1.1 connection, while its requests are plain jobs (see the module)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 paths: frozenset[bytes], body_limit: int) -> None:  # fmt: skip
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.app = config.loaded_app
        self.paths, self.body_limit = paths, body_limit
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buffer = bytearray()
        self.head: Head | None = None  # the request whose body is being read
        self.job: asyncio.Task[None] | None = None  # the request being answered
        self.gone: asyncio.Future[None] = self.loop.create_future()  # the client went away
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False  # close once the job in flight is answered
        self.paused = False
        self.idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.scheme = "https" if is_ssl(self.transport) else "http"
        self.server = get_local_addr(self.transport)
        self.client = get_remote_addr(self.transport)
        self.server_state.connections.add(self)
        self._wait_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._stop_idle()
        if not self.gone.done():
            self.gone.set_result(None)
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
        protocol = ZttpProtocol(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.app_state,
            _loop=self.loop,
        )  # fmt: skip
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if self.buffer:
            protocol.data_received(bytes(self.buffer))
        self.buffer.clear()

    async def _serve(self, head: Head, body: bytes) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "server": self.server, "client": self.client,
            "scheme": self.scheme, "method": "POST", "root_path": "",
            "path": head.target.decode("ascii"), "raw_path": head.target, "query_string": b"",
            "headers": head.headers, "state": self.app_state.copy(),
        }  # fmt: skip
        answer = _Answer(self, body, close=head.close or self.closing)
        try:
            await self.app(scope, answer.receive, answer.send)
        except Exception:
            log.exception("job failed")
            if not answer.started:
                plain = [(b"content-type", b"text/plain; charset=utf-8")]
                await answer.send({"type": "http.response.start", "status": 500, "headers": plain})
                await answer.send({"type": "http.response.body", "body": b"Internal Server Error"})
            answer.close = True
        if not answer.done:
            answer.close = True  # the app ended without a whole answer: the client must not wait
        self.job = None
        if answer.close or self.closing or self.transport.is_closing():
            self.transport.close()
            return
        self._wait_idle()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._next()

    # -- keep-alive ----------------------------------------------------------------------
    def _wait_idle(self) -> None:
        self._stop_idle()
        self.idle = self.loop.call_later(self.config.timeout_keep_alive, self.transport.close)

    def _stop_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None


class _Answer:
    """One request's ASGI receive and send: the answer goes out as one write, or chunked."""

    __slots__ = ("body", "chunked", "close", "conn", "done", "head", "started")

    def __init__(self, conn: LeanJobs, body: bytes, close: bool) -> None:
        self.conn, self.close = conn, close
        self.body: bytes | None = body  # the request body, until the app has read it
        self.head: list[bytes] = []
        self.started = self.chunked = self.done = False

    async def receive(self) -> dict[str, Any]:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.conn.gone  # after the body, the only event left is the client leaving
        return _DISCONNECT

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        conn = self.conn
        if kind == "http.response.start":
            status = message["status"]
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
            length = False
            for name, value in message.get("headers", ()):
                head.append(b"%s: %s\r\n" % (name, value))
                length = length or name.lower() == b"content-length"
            for name, value in conn.server_state.default_headers:
                head.append(b"%s: %s\r\n" % (name, value))
            if not length:
                self.chunked = True
                head.append(b"transfer-encoding: chunked\r\n")
            if self.close or conn.closing:  # the client's wish, or a graceful stop
                self.close = True
                head.append(b"connection: close\r\n")
            self.head, self.started = head, True
            return
        if kind != "http.response.body" or self.done:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.chunked:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
        else:
            out = body
        if self.head:
            self.head.append(b"\r\n")
            out = b"".join(self.head) + out
            self.head = []
        self.done = not more
        if conn.transport.is_closing():
            return
        conn.transport.write(out)
        if more:
            await conn.writable.wait()  # a streaming answer waits for a slow reader
