"""The proxy's runner client (proxy/upstream.py) against a real socket server that answers
with exact HTTP/1.1 bytes: the framing rules are RFC 9112's (Content-Length, chunked,
close-delimited; `Connection: close`), and the failure split is the one the router relies
on (nothing answered: retry elsewhere; answer broken: fail)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from kubepeer.proxy.upstream import RunnerBroken, RunnerClient, RunnerUnreachable

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def serve(script: Script) -> tuple[asyncio.Server, str, list[int]]:
    """A server running `script` per connection; the list counts connections."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


def answers(*parts: bytes) -> Script:
    """A script that reads one request and writes `parts`, one write each."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for part in parts:
            writer.write(part)
            await writer.drain()

    return script


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_keep_alive_answers_reuse_one_connection_and_carry_the_request():
    seen: list[tuple[bytes, bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"ok": true')
            writer.write(b"}")
            await writer.drain()

    async def test() -> None:
        server, url, connections = await serve(script)
        client = RunnerClient()
        for n in range(3):
            answer = await client.post(url, "/text-to-image", b'{"n": %d}' % n,
                                       {"Content-Type": "application/json"})  # fmt: skip
            assert answer.status == 200
            assert await answer.read() == b'{"ok": true}'
        assert len(connections) == 1
        head, body = seen[2]
        assert head.startswith(b"POST /text-to-image HTTP/1.1\r\n")
        assert f"Host: {url.removeprefix('http://')}".encode() in head
        assert b"Content-Type: application/json" in head
        assert body == b'{"n": 2}'
        client.close()
        server.close()

    run(test)


def test_connection_close_is_not_reused():
    async def test() -> None:
        server, url, connections = await serve(
            answers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        )
        client = RunnerClient()
        for _ in range(2):
            answer = await client.post(url, "/llm", b"{}", {})
            assert await answer.read() == b"ok"
        assert len(connections) == 2
        server.close()

    run(test)


def test_chunked_answers_arrive_line_by_line_as_sent():
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"a\r\ndata: one\n\r\n")
        await writer.drain()
        await release.wait()  # the client must have the first line before the second exists
        writer.write(b"6\r\ndata: \r\n4\r\ntwo\n\r\n0\r\n\r\n")
        await writer.drain()

    async def test() -> None:
        server, url, _ = await serve(script)
        client = RunnerClient()
        answer = await client.post(url, "/llm", b"{}", {})
        lines = answer.lines()
        assert await anext(lines) == b"data: one\n"
        release.set()
        assert [line async for line in lines] == [b"data: two\n"]
        answer.release()
        server.close()

    run(test)


def test_a_body_without_length_ends_at_close():
    async def test() -> None:
        server, url, _ = await serve(answers(b"HTTP/1.1 200 OK\r\n\r\nuntil the ", b"end"))
        answer = await RunnerClient().post(url, "/x", b"", {})
        assert await answer.read() == b"until the end"
        server.close()

    run(test)


def test_nothing_answered_is_unreachable_and_a_cut_answer_is_broken():
    async def test() -> None:
        client = RunnerClient()
        server, url, _ = await serve(answers())
        with pytest.raises(RunnerUnreachable):
            await client.post(url, "/x", b"{}", {})
        server.close()
        server, url, _ = await serve(
            answers(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        )
        answer = await client.post(url, "/x", b"{}", {})
        assert answer.status == 200
        with pytest.raises(RunnerBroken):
            await answer.read()
        server.close()

    run(test)


def test_a_refused_connection_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: the connection is refused

        async def test() -> None:
            with pytest.raises(RunnerUnreachable, match="cannot connect"):
                await RunnerClient().post(f"http://127.0.0.1:{port}", "/x", b"", {})

        run(test)


def test_an_interim_100_continue_is_skipped():
    async def test() -> None:
        server, url, _ = await serve(answers(
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope",
        ))  # fmt: skip
        answer = await RunnerClient().post(url, "/x", b"", {})
        assert (answer.status, await answer.read()) == (400, b"nope")
        server.close()

    run(test)


def test_a_job_cancelled_while_waiting_leaves_no_connection_to_reuse():
    first = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not first.is_set():
            first.set()
            await asyncio.sleep(0.5)  # answers late, to a client that has gone
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()
        await read_request(reader)  # a reuse would be answered with nothing more

    async def test() -> None:
        server, url, connections = await serve(script)
        client = RunnerClient()
        waiting = asyncio.create_task(client.post(url, "/x", b"", {}))
        await first.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.6)
        answer = await client.post(url, "/x", b"", {})
        assert await answer.read() == b"late"
        assert len(connections) == 2
        server.close()

    run(test)


def closes_at_the_second_request(*, answered: int) -> Script:
    """A runner whose server closed a kept-alive connection just as the next request came
    (the idle-close race): it answers `answered` requests in all, one per connection, then
    drops each later request unanswered."""
    served: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            if len(served) >= answered:
                return  # closed, nothing answered
            served.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await read_request(reader)
            return  # the next request on this connection goes unanswered

    return script


def test_a_kept_alive_connection_closed_before_answering_is_tried_once_more_afresh():
    async def test() -> None:
        server, url, connections = await serve(closes_at_the_second_request(answered=2))
        client = RunnerClient()
        for _ in range(2):
            answer = await client.post(url, "/x", b"{}", {})
            body = await answer.read()
            assert (answer.status, body) == (200, b"ok")
        assert len(connections) == 2  # the second job: its kept-alive one, then a new one
        server.close()

    run(test)


def test_a_runner_that_drops_the_new_connection_too_is_unreachable():
    async def test() -> None:
        server, url, connections = await serve(closes_at_the_second_request(answered=1))
        client = RunnerClient()
        assert await (await client.post(url, "/x", b"{}", {})).read() == b"ok"
        with pytest.raises(RunnerUnreachable):
            await client.post(url, "/x", b"{}", {})
        assert len(connections) == 2  # once more afresh, not again and again
        server.close()

    run(test)
