"""The proxy's listener on HTTP/1.1 (proxy/http1.py): jobs served by its own lean protocol,
everything else by uvicorn's, on one real uvicorn server and raw sockets. Answers are read
with h11, an HTTP/1.1 implementation of its own, as the oracle of what is well formed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import h11
import pytest
from uvicorn.protocols.http.zttp_impl import ZttpProtocol

from kubepeer.proxy.http1 import LeanJobs, Reply, Respond, parse_head
from kubepeer.proxy.server import hypercorn_config, uvicorn_server

JOB = "/text-to-image"
LIMIT = 4096


class App:
    """The server's two sides: `lean`, the handler http1.py starts for plain jobs, and the
    ASGI app uvicorn calls for everything else. Both echo what they were given as JSON. On
    the lean side a job is answered at once, as the proxy refuses a job; `/later` from a
    timer's callback 10 ms on, as the proxy answers from its runner's; `/slow` from a task
    once `release` is set. `/llm` streams three pieces, `/drip` a piece every 20 ms (at
    most 100) until the client leaves, and `/boom` raises."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.drip_closed = threading.Event()
        self.drips = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def lean(self, path: str, headers: dict[str, str], body: bytes, respond: Respond) -> None:
        echo = Reply(200, b"application/json", _echo("POST", path, body, headers.items()))
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/twice":  # answers with a stream, then fails: the answer stands, alone
            respond(Reply(200, b"text/event-stream", stream=self._pieces()))
            raise RuntimeError("after the answer")
        if path == "/later":
            asyncio.get_running_loop().call_later(0.01, respond, echo)
        elif path == "/slow":
            task = asyncio.get_running_loop().create_task(self._slow(respond, echo))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif path == "/llm":
            respond(Reply(200, b"text/event-stream", stream=self._pieces()))
        elif path == "/drip":
            respond(Reply(200, b"text/event-stream", stream=self._drip()))
        elif path == "/broken":
            respond(Reply(200, b"text/event-stream", stream=self._broken()))
        else:
            respond(echo)

    async def _slow(self, respond: Respond, reply: Reply) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        respond(reply)

    async def _pieces(self) -> AsyncIterator[bytes]:
        for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"):
            yield piece

    async def _broken(self) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise ConnectionResetError("the runner went away mid-stream")

    async def _drip(self) -> AsyncIterator[bytes]:
        try:
            for _ in range(100):
                self.drips += 1
                yield b"data: drip\n\n"
                await asyncio.sleep(0.02)
        finally:
            self.drip_closed.set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reply = _echo(scope["method"], scope["path"], body, scope["headers"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(reply)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": reply})


def _echo(method: str, path: str, body: bytes, headers: Iterable[tuple[Any, Any]]) -> bytes:
    """The request as JSON; header names and values as text, from bytes (ASGI) or str."""
    pairs = [[_text(name), _text(value)] for name, value in headers]
    return json.dumps(
        {"method": method, "path": path, "body": body.decode(), "headers": pairs}
    ).encode()


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


class Listener:
    def __init__(self, app: App, keep_alive: int = 5, read_timeout: float = 30) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = hypercorn_config(f"127.0.0.1:{self.port}", "http://127.0.0.1", plaintext=True,
                                  graceful_seconds=10)  # fmt: skip
        config.keep_alive_timeout = keep_alive
        paths = (JOB, "/later", "/llm", "/drip", "/broken", "/boom", "/twice", "/slow")
        self.server = uvicorn_server(app, config, (paths, LIMIT, app.lean, read_timeout))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()))
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def connect(self) -> Client:
        return Client(socket.create_connection(("127.0.0.1", self.port), timeout=5))

    def protocols(self) -> list[type]:
        return [type(c) for c in list(self.server.server_state.connections)]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def answer(self) -> tuple[h11.Response, list[bytes]]:
        """The next whole answer: its head and its body as the pieces h11 read."""
        if self.h11.our_state is h11.IDLE:  # the request went raw; h11 only has to expect one
            self.h11.send(
                h11.Request(
                    method="POST", target="/", headers=[("Host", "proxy"), ("Content-Length", "0")]
                )
            )
            self.h11.send(h11.EndOfMessage())
        head, pieces = None, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                pieces.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return head, pieces
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("closed before an answer")

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def job(path: str = JOB, body: bytes = b'{"prompt": "x"}', extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: proxy", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *extra]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def echoed(pieces: list[bytes]) -> dict[str, Any]:
    return json.loads(b"".join(pieces))


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def listener(app: App) -> Iterator[Listener]:
    running = Listener(app)
    yield running
    app.release.set()
    running.stop()


# -- the head parser ------------------------------------------------------------------------
PATHS = frozenset({JOB})
PLAIN = (
    b"POST /text-to-image HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
    b"Content-Length: 12"
)


def test_a_plain_job_head_is_parsed_with_lowercased_names():
    head = parse_head(PLAIN + b"\r\nX-Request-Id:  abc \r\nConnection: Close", PATHS)
    assert head is not None
    assert (head.target, head.length, head.close) == (JOB, 12, True)
    assert head.headers == {"host": "p", "content-type": "application/json",
                            "content-length": "12", "x-request-id": "abc",
                            "connection": "Close"}  # fmt: skip


def test_a_repeated_header_reads_as_its_first_value_as_go_and_starlette_read_it():
    """Go's http.Header.Get returns the first value; so does starlette's Headers.get, which
    reads the same head on the ASGI path."""
    from starlette.datastructures import Headers

    head = parse_head(PLAIN + b"\r\nAuthorization: Bearer first\r\nAuthorization: Bearer 2", PATHS)
    assert head is not None
    raw = [(b"authorization", b"Bearer first"), (b"authorization", b"Bearer 2")]
    assert head.headers["authorization"] == Headers(raw=raw)["authorization"] == "Bearer first"


def test_header_values_are_latin_1_text_as_asgi_servers_decode_them():
    head = parse_head(PLAIN + b"\r\nX-Name: caf\xe9", PATHS)
    assert head is not None
    assert head.headers["x-name"] == "caf\xe9"


@pytest.mark.parametrize(
    "head",
    [
        PLAIN.replace(b"POST", b"GET"),
        PLAIN.replace(b"/text-to-image", b"/healthz"),
        PLAIN.replace(b"/text-to-image", b"/text-to-image?x=1"),
        PLAIN.replace(b"HTTP/1.1", b"HTTP/1.0"),
        PLAIN.replace(b"\r\nContent-Length: 12", b""),
        PLAIN + b"\r\nContent-Length: 12",
        PLAIN.replace(b"12", b"-1"),
        PLAIN.replace(b"12", b"0x1"),
        PLAIN.replace(b"12", b"\xb9\xb2"),
        PLAIN.replace(b"12", b"1" * 19),
        PLAIN + b"\r\nTransfer-Encoding: chunked",
        PLAIN + b"\r\nExpect: 100-continue",
        PLAIN + b"\r\nUpgrade: h2c",
        PLAIN + b"\r\nX-Folded: a\r\n b",
        PLAIN + b"\r\nBad Name: a",
        PLAIN + b"\r\nX-Ctl: a\x01b",
        PLAIN + b"\r\nX-Bare-LF: a\nb",
        PLAIN + b"\r\nNo-Colon",
    ],
    ids=[
        "get",
        "other-path",
        "query",
        "http10",
        "no-length",
        "two-lengths",
        "negative",
        "hex",
        "superscript-digits",
        "past-63-bits",
        "chunked",
        "expect",
        "upgrade",
        "obs-fold",
        "space-in-name",
        "control",
        "bare-lf",
        "no-colon",
    ],
)
def test_anything_but_a_plain_job_is_left_to_uvicorn(head: bytes):
    assert parse_head(head, PATHS) is None


# -- on a real server -----------------------------------------------------------------------
def test_jobs_on_one_connection_are_answered_in_order_by_the_lean_protocol(listener: Listener):
    client = listener.connect()
    for n in range(3):
        client.send(job(body=b'{"n": ' + str(n).encode() + b"}", extra=(f"X-Request-Id: r{n}",)))
        head, pieces = client.answer()
        assert head.status_code == 200
        reply = echoed(pieces)
        assert (reply["method"], reply["path"], reply["body"]) == ("POST", JOB, f'{{"n": {n}}}')
        assert ["x-request-id", f"r{n}"] in reply["headers"]
    assert listener.protocols() == [LeanJobs]


def test_pipelined_jobs_are_answered_one_by_one_in_order(listener: Listener):
    client = listener.connect()
    client.send(b"".join(job(body=b'{"n": ' + str(n).encode() + b"}") for n in range(4)))
    assert [echoed(client.answer()[1])["body"] for _ in range(4)] == [
        f'{{"n": {n}}}' for n in range(4)
    ]


def test_many_pipelined_jobs_answered_at_once_are_answered_in_order(listener: Listener, app: App):
    """More jobs waiting in the buffer than Python's recursion limit (they pile up behind a
    slow one): each answer given during its own start must lead to the next job by a loop,
    not by a call one level deeper each time."""
    many = 1500
    raised = sys.getrecursionlimit()  # py_ecc, imported by the payment tests, raises it
    sys.setrecursionlimit(1000)  # Python's own
    try:
        client = listener.connect()
        client.send(job("/slow", body=b"first"))
        client.send(b"".join(job(body=str(n).encode()) for n in range(many)))
        time.sleep(0.2)  # read up to the high-water mark, behind the slow job
        app.release.set()
        assert echoed(client.answer()[1])["body"] == "first"
        assert [echoed(client.answer()[1])["body"] for _ in range(many)] == [
            str(n) for n in range(many)
        ]
    finally:
        sys.setrecursionlimit(raised)
    assert listener.protocols() == [LeanJobs]


def test_jobs_answered_later_from_a_callback_are_answered_in_order(listener: Listener):
    client = listener.connect()
    client.send(b"".join(job("/later", body=str(n).encode()) for n in range(3)))
    assert [echoed(client.answer()[1])["body"] for _ in range(3)] == ["0", "1", "2"]
    client.send(job(body=b"now"))
    assert echoed(client.answer()[1])["body"] == "now"


def test_a_job_arriving_byte_by_byte_is_served(listener: Listener):
    client = listener.connect()
    for byte in job(body=b'{"slow": true}'):
        client.send(bytes([byte]))
    assert echoed(client.answer()[1])["body"] == '{"slow": true}'


def test_the_first_other_request_moves_the_connection_to_uvicorn_for_good(listener: Listener):
    client = listener.connect()
    client.send(job(body=b"1"))
    assert echoed(client.answer()[1])["body"] == "1"
    client.send(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n" + job(body=b"2"))
    head, pieces = client.answer()
    assert (head.status_code, echoed(pieces)["method"]) == (200, "GET")
    assert echoed(client.answer()[1])["body"] == "2"  # pipelined behind it: uvicorn's too
    assert listener.protocols() == [ZttpProtocol]


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /text-to-image HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nbody\r\n0\r\n\r\n",
        job(body=b"x" * (LIMIT + 1)),
        job(body=b"body", extra=("Expect: 100-continue",)),
    ],
    ids=["chunked-body", "over-the-lean-limit", "expect"],
)
def test_a_job_that_is_not_plain_is_served_by_uvicorn_all_the_same(listener: Listener, raw):
    client = listener.connect()
    client.send(raw)
    head, pieces = client.answer()
    assert head.status_code == 200
    assert echoed(pieces)["body"] in ("body", "x" * (LIMIT + 1))
    assert listener.protocols() == [ZttpProtocol]


def test_a_streamed_answer_goes_out_chunked_piece_by_piece(listener: Listener):
    client = listener.connect()
    client.send(job("/llm"))
    head, pieces = client.answer()
    assert dict(head.headers)[b"transfer-encoding"] == b"chunked"
    assert pieces == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    client.send(job(body=b"after"))  # the connection is still good
    assert echoed(client.answer()[1])["body"] == "after"


def test_connection_close_is_honoured(listener: Listener):
    client = listener.connect()
    client.send(job(body=b"1", extra=("Connection: close",)))
    head, _ = client.answer()
    assert dict(head.headers)[b"connection"] == b"close"
    assert client.closed()


def test_an_app_failure_is_a_500_and_the_connection_is_closed(listener: Listener):
    client = listener.connect()
    client.send(job("/boom"))
    head, pieces = client.answer()
    assert (head.status_code, b"".join(pieces)) == (500, b"Internal Server Error")
    assert client.closed()


def test_a_handler_that_fails_after_answering_leaves_its_answer_alone(listener: Listener):
    client = listener.connect()
    client.send(job("/twice"))
    assert client.answer()[1] == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    client.send(job(body=b"next"))  # no stray 500 in between, the connection still good
    head, pieces = client.answer()
    assert (head.status_code, echoed(pieces)["body"]) == (200, "next")


def test_a_stream_that_breaks_midway_closes_the_connection(listener: Listener):
    """A chunked body that cannot end properly must not leave the client waiting."""
    client = listener.connect()
    client.send(job("/broken"))
    received = b""
    while chunk := client.sock.recv(65536):  # EOF, or the socket's 5 s timeout fails it
        received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"data: 1" in received
    assert not received.endswith(b"0\r\n\r\n")  # no clean end: the gateway sees it broke


def test_a_client_that_leaves_mid_stream_ends_the_stream(listener: Listener, app: App):
    client = listener.connect()
    client.send(job("/drip"))
    assert client.sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    client.sock.close()
    assert app.drip_closed.wait(5), "the stream went on after the client left"
    assert app.drips < 100


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(app: App):
    running = Listener(app, keep_alive=1)
    try:
        client = running.connect()
        client.send(job(body=b"1"))
        client.answer()
        started = time.monotonic()
        assert client.closed()
        assert 0.5 < time.monotonic() - started < 4
    finally:
        running.stop()


@pytest.mark.parametrize(
    "partial",
    [job(body=b'{"prompt": "x"}')[:20],  # a head sent a byte at a time, then nothing
     job(body=b'{"prompt": "x"}')[:-5]],  # a body that stops short of its length
    ids=["head", "body"],
)  # fmt: skip
def test_a_request_not_whole_within_the_read_timeout_is_answered_408_and_closed(app, partial):
    """Go's ReadTimeout: a slow or stalled request holds its connection and what it sent for
    the read timeout at most (it was the keep-alive's 10 minutes, or for ever)."""
    running = Listener(app, keep_alive=600, read_timeout=1)
    try:
        client = running.connect()
        client.send(job(body=b"1"))  # a whole one first: the clock starts at each request
        assert echoed(client.answer()[1])["body"] == "1"
        for byte in partial[:5]:
            client.send(bytes([byte]))
            time.sleep(0.1)
        client.send(partial[5:])
        client.sock.settimeout(10)
        answer = client.sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert answer.endswith(b"\r\n\r\nrequest not received in time\r\n")
        assert client.closed()
    finally:
        running.stop()


def test_a_connection_in_use_outlives_the_keep_alive_timeout(app: App):
    """The timeout counts from the last answer, not from the connection's start."""
    running = Listener(app, keep_alive=1)
    try:
        client = running.connect()
        for n in range(8):  # 2 s of jobs, 0.25 s apart
            client.send(job(body=str(n).encode()))
            assert echoed(client.answer()[1])["body"] == str(n)
            time.sleep(0.25)
        client.send(job("/later", body=b"last"))
        assert echoed(client.answer()[1])["body"] == "last"
        started = time.monotonic()
        assert client.closed()
        assert 0.5 < time.monotonic() - started < 4
    finally:
        running.stop()


def test_a_graceful_stop_finishes_the_job_in_flight_then_closes(app: App):
    running = Listener(app)
    client = running.connect()
    client.send(job("/slow"))
    time.sleep(0.2)
    running.server.should_exit = True
    time.sleep(0.3)
    assert running.thread.is_alive()  # waiting for the job
    app.release.set()
    head, pieces = client.answer()
    assert (head.status_code, echoed(pieces)["path"]) == (200, "/slow")
    assert dict(head.headers)[b"connection"] == b"close"
    assert client.closed()
    running.thread.join(timeout=10)
    assert not running.thread.is_alive()
