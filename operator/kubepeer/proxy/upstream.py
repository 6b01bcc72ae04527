"""The proxy's HTTP/1.1 client to runners, for batch jobs: keep-alive connections per runner.

A job's hop to its runner is on the gateway's critical path. aiohttp's client costs about
a third of the proxy's CPU per job (cookies, redirects, tracing, proxies: none of which a
runner needs), so jobs take this lean one instead: one POST written as a single buffer,
the answer parsed by httptools (llhttp, C), connections kept per runner and reused.

`post` answers at the answer's head: a whole body is then `read()`, an llm stream read as
it comes (`lines()`).

Failures are split as the router needs them: `RunnerUnreachable` when the runner refused
or dropped the connection before a status line (nothing was answered: the job may go to
another replica), `RunnerBroken` for anything after that (the job fails). A kept-alive
connection that closes before a status line is first tried once more, on a new connection
to the same runner: a runner's server closes idle connections, and one may close just as a
request goes out on it, which says nothing about the runner. Only if the new connection
fails too is the runner unreachable.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT = 2.0
# uvicorn (the runner's server) drops idle connections after 5 s; reusing one near that
# races its close, so an idle connection older than this is closed instead of reused.
IDLE_REUSE_SECONDS = 4.0


_FRAMING = (b"content-length", b"transfer-encoding")


class RunnerUnreachable(Exception):
    """No status line came back: connection refused, timed out or closed first."""


class RunnerBroken(Exception):
    """The runner answered, then broke the answer (closed mid-body, bad HTTP)."""


class Answer:
    """A runner's answer: the status at once, the body as it arrives. (Its headers are read
    for the body's framing only: the proxy passes none of them on.)"""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self._framed = False  # a Content-Length or Transfer-Encoding came
        self._chunks: deque[bytes] = deque()
        self._complete = False
        self._error: Exception | None = None
        self._head: asyncio.Future[None] | None = None
        self._more: asyncio.Future[None] | None = None

    def _body_whole(self) -> bytes:
        """The whole body of a complete answer, its connection released (reused or closed)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self.release()
        return data

    # -- fed by the connection -------------------------------------------------------
    def _headed(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def _body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self._complete:
            return
        self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def _wait(self) -> None:
        self._more = asyncio.get_running_loop().create_future()
        await self._more
        self._more = None

    # -- read by the proxy -------------------------------------------------------------
    async def read(self) -> bytes:
        """The whole body (the connection goes back to the pool when it is reusable)."""
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._body_whole()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece, as the runner sends it (llm SSE)."""
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    async def lines(self) -> AsyncIterator[bytes]:
        """The body line by line (each with its b"\\n"), as the lines complete."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            *done, pending = pending.split(b"\n")
            for line in done:
                yield line + b"\n"
        if pending:
            yield pending

    def release(self) -> None:
        """Done with the answer: its connection is pooled again if the answer was read to
        its end and the runner keeps it alive, else closed."""
        if self._connection is not None:
            self._connection.finished(self)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: RunnerClient, key: tuple[str, int]) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self._until_eof = False  # a body with neither length nor chunking ends at close
        self._keep_alive = False  # read at the answer's end (the parser forgets it after)
        self._header_name = b""
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(RunnerBroken(f"bad HTTP from the runner: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        answer = self.answer
        if answer is None:
            return
        if self._until_eof and answer.status:
            answer._finish()
        elif not answer.status:
            answer._fail(RunnerUnreachable(f"the runner closed the connection ({exc or 'EOF'})"))
        else:
            answer._fail(RunnerBroken(f"the runner closed the connection mid-answer ({exc})"))
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- httptools callbacks -----------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in _FRAMING:
            assert self.answer is not None
            self.answer._framed = True

    def on_headers_complete(self) -> None:
        answer = self.answer
        assert answer is not None
        answer.status = self.parser.get_status_code()
        self._until_eof = (
            not answer._framed
            and answer.status not in (204, 304)
            and not 100 <= answer.status < 200
        )
        if 100 <= answer.status < 200:  # an interim answer: the real one follows
            answer._framed = False
            answer.status = 0
            return
        answer._headed()

    def on_body(self, body: bytes) -> None:
        assert self.answer is not None
        self.answer._body(body)

    def on_message_complete(self) -> None:
        answer = self.answer
        if answer is None or not answer.status:
            return
        self._keep_alive = self.parser.should_keep_alive()
        answer._finish()

    # -- the client's side ---------------------------------------------------------------
    async def send(self, request: bytes) -> Answer:
        assert self.transport is not None
        if self.closed:
            raise RunnerUnreachable("the runner closed the connection first")
        self.answer = answer = Answer(self)
        answer._head = self.loop.create_future()
        self.transport.write(request)
        try:
            if self._writable is not None:  # a big body: wait for the kernel to take it
                await self._writable
            await answer._head
        except BaseException:  # cancelled (the gateway left) or failed: never reused
            self.answer = None
            self.close()
            raise
        return answer

    def finished(self, answer: Answer) -> None:
        if answer is not self.answer:
            return
        if (
            answer._complete
            and not answer._chunks
            and not self.closed
            and not self._until_eof
            and self._keep_alive
        ):
            self.answer = None
            self._keep_alive = False
            self.parser = httptools.HttpResponseParser(self)
            self.pool.put_back(self)
        else:
            self.answer = None
            self.close()

    def _broken(self, error: Exception) -> None:
        if self.answer is not None:
            self.answer._fail(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RunnerClient:
    """Keep-alive connections to runners, by (host, port); no limit on their number (the
    router bounds jobs in flight per runner)."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}  # url -> host, port, Host header

    async def post(self, url: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST `body` to `url` + `path`; the answer once its status line and headers are in."""
        host, port, request = self._request(url, path, body, headers)
        connection = self._reuse((host, port))
        if connection is not None:
            try:
                return await connection.send(request)
            except RunnerUnreachable:  # closed as it sat idle: once more, on a new connection
                pass
        return await (await self._connect(host, port)).send(request)

    def _request(
        self, url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[str, int, bytes]:
        host, port, host_header = self._target(url)
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            path.encode(), host_header, len(body),
            b"".join(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                     for name, value in headers.items()),
        )  # fmt: skip
        return host, port, head + body  # the body copied once (it may be megabytes)

    def _target(self, url: str) -> tuple[str, int, bytes]:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"runner URL {url!r}: only http://host:port is supported")
            target = (parts.hostname, parts.port or 80, parts.netloc.encode())
            self._targets[url] = target
        return target

    def _reuse(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closing
            if not connection.closed and now - connection.idle_since < IDLE_REUSE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, (host, port)), host, port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise RunnerUnreachable(f"cannot connect to {host}:{port}: {exc!r}") from None
        return connection

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.key, []).append(connection)

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
