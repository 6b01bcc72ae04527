"""The trickle server under /ai/trickle/ as gateway-wire 5.2 describes go-livepeer's:
two real proxy processes sharing one real Redis, spoken to over HTTP.

Channels are made as `/live-video-to-video` makes them (TrickleStore.create in the shared
Redis: the protocol has no autocreate), then everything goes through the proxies' HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis

from kubepeer.proxy.trickle import CLOSED, DONE, TrickleStore
from tests.proxies import ProxyServer, models_json, start_proxy, stop_proxy

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def replicas(redis_server, tmp_path_factory) -> Iterator[tuple[ProxyServer, ProxyServer]]:
    """Two proxy replicas (private mode, plaintext) over one Redis."""
    shared = tmp_path_factory.mktemp("trickle-shared")
    (shared / "bearer").write_text("private-token")
    proxies = [
        start_proxy(tmp_path_factory.mktemp(f"trickle-{i}"), redis_server, models=models_json(),
                    endpoints={}, plaintext=True, shared=shared if i else None,
                    args=["--no-payments", "--bearer-token-file", str(shared / "bearer")])
        for i in range(2)
    ]  # fmt: skip
    yield proxies[0], proxies[1]
    for proxy in proxies:
        stop_proxy(proxy)


def make_channel(redis_server, mime: str = "video/MP2T") -> str:
    name = secrets.token_hex(8)

    async def create() -> None:
        store = TrickleStore(AsyncRedis.from_url(redis_server.url))
        await store.create(name, mime)
        await store.redis.aclose()

    asyncio.run(create())
    return name


def url(proxy: ProxyServer, channel: str, seq: int | str) -> str:
    return f"{proxy.url}/ai/trickle/{channel}/{seq}"


def test_unknown_channel_is_404_for_every_verb(replicas):
    proxy, _ = replicas
    with httpx.Client(timeout=10) as client:
        assert client.get(url(proxy, "nosuchchannel", 0)).status_code == 404
        refused = client.post(url(proxy, "nosuchchannel", 0), content=b"x")
        assert refused.status_code == 404
        assert refused.text.strip() == "Stream not found"
        assert client.get(f"{proxy.url}/ai/trickle/nosuchchannel/next").status_code == 404
        assert client.delete(f"{proxy.url}/ai/trickle/nosuchchannel").status_code == 400


def test_ring_keeps_five_segments_and_answers_470_outside_it(replicas, redis_server):
    writer, reader = replicas  # written through one replica, read through the other
    channel = make_channel(redis_server)
    with httpx.Client(timeout=10) as client:
        for seq in range(7):
            posted = client.post(url(writer, channel, seq), content=f"segment {seq}".encode())
            assert posted.status_code == 200
        for seq in range(2, 7):  # the last five
            got = client.get(url(reader, channel, seq))
            assert got.status_code == 200
            assert got.content == f"segment {seq}".encode()
            assert got.headers["lp-trickle-seq"] == str(seq)
            assert got.headers["content-type"] == "video/MP2T"
        for seq in (0, 1, 9):  # evicted, and too far ahead
            gone = client.get(url(reader, channel, seq))
            assert gone.status_code == 470
            assert gone.headers["lp-trickle-latest"] == "7"
            assert gone.headers["lp-trickle-seq"] == str(seq)
        nxt = client.get(f"{reader.url}/ai/trickle/{channel}/next")
        assert nxt.text.strip() == "7"
        assert nxt.headers["lp-trickle-latest"] == "7"
        current = client.get(url(reader, channel, -2))  # -2: the segment written last
        assert current.headers["lp-trickle-seq"] == "6"
        assert current.content == b"segment 6"


def test_publish_with_seq_minus_one_writes_the_next_position(replicas, redis_server):
    proxy, _ = replicas
    channel = make_channel(redis_server, "application/json")
    with httpx.Client(timeout=10) as client:
        assert client.post(url(proxy, channel, -1), content=b'{"a": 1}').status_code == 200
        assert client.post(url(proxy, channel, -1), content=b'{"a": 2}').status_code == 200
        second = client.get(url(proxy, channel, 1))
        assert second.json() == {"a": 2}
        assert second.headers["content-type"] == "application/json"


async def _chunks(parts: list[bytes], gate: asyncio.Event):
    yield parts[0]
    await gate.wait()
    for part in parts[1:]:
        yield part


def test_bytes_reach_a_reader_while_the_segment_is_still_being_written(replicas, redis_server):
    writer, reader = replicas
    channel = make_channel(redis_server)

    async def scenario() -> tuple[bytes, bytes, dict]:
        gate = asyncio.Event()
        first_seen = asyncio.Event()
        got: dict = {}

        async def read() -> None:
            # A reader waiting at the live edge (-1) before anything is published.
            async with client.stream("GET", url(reader, channel, -1)) as response:
                chunks = response.aiter_bytes()
                got["first"] = await chunks.__anext__()
                first_seen.set()
                got["rest"] = b"".join([chunk async for chunk in chunks])
                got["headers"] = dict(response.headers)

        async with httpx.AsyncClient(timeout=20) as client:
            reading = asyncio.ensure_future(read())
            await asyncio.sleep(0.3)
            post = asyncio.ensure_future(
                client.post(url(writer, channel, 0), content=_chunks([b"first", b"rest"], gate))
            )
            await asyncio.wait_for(first_seen.wait(), 10)
            assert not post.done()  # the first bytes arrived with the post still open
            gate.set()
            assert (await post).status_code == 200
            await asyncio.wait_for(reading, 10)
        return got["first"], got["rest"], got["headers"]

    first, rest, headers = asyncio.run(scenario())
    assert first + rest == b"firstrest"
    assert headers["lp-trickle-seq"] == "0"


def test_close_propagates_to_waiting_readers_and_preconnected_writers(replicas, redis_server):
    writer, reader = replicas
    channel = make_channel(redis_server)

    async def scenario() -> tuple[httpx.Response, httpx.Response, int]:
        async with httpx.AsyncClient(timeout=20) as client:
            waiting = asyncio.ensure_future(client.get(url(reader, channel, 0)))
            gate = asyncio.Event()  # a publisher preconnected to 0 that never sends a byte
            preconnected = asyncio.ensure_future(
                client.post(url(writer, channel, 0), content=_chunks([b""], gate))
            )
            await asyncio.sleep(0.5)
            closed = await client.delete(f"{writer.url}/ai/trickle/{channel}")
            got = await asyncio.wait_for(waiting, 10)
            gate.set()  # httpx reads a response only once its body is sent (Go's does not wait)
            posted = await asyncio.wait_for(preconnected, 10)
            after = await client.get(url(reader, channel, 0))
            assert closed.status_code == 200
            return got, posted, after.status_code

    got, posted, after = asyncio.run(scenario())
    assert got.status_code == 200
    assert got.headers["lp-trickle-closed"] == "terminated"
    assert posted.headers.get("lp-trickle-closed") == "terminated"
    assert after == 404


def test_a_slow_reader_does_not_stall_the_writer(replicas, redis_server):
    writer, reader = replicas
    channel = make_channel(redis_server)
    segment = bytes(range(256)) * 4096  # 1 MiB
    # A reader that asks for segment 0 and then reads nothing at all.
    slow = socket.create_connection(("127.0.0.1", reader.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(f"GET /ai/trickle/{channel}/0 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        time.sleep(0.3)
        with httpx.Client(timeout=30) as client:
            for seq in range(8):  # 8 MiB: far more than the slow reader's socket holds
                assert client.post(url(writer, channel, seq), content=segment).status_code == 200
            latest = client.get(url(reader, channel, 7))
        assert latest.status_code == 200
        assert latest.content == segment
        slow.setblocking(False)
        try:
            unread = len(slow.recv(16 * 1024 * 1024))
        except BlockingIOError:
            unread = 0
        assert unread < 8 * len(segment)  # the writer finished with the reader far behind
    finally:
        slow.close()


def test_idle_channels_are_swept(redis_server):
    channel = make_channel(redis_server)

    async def scenario() -> tuple[list[str], bool]:
        store = TrickleStore(AsyncRedis.from_url(redis_server.url), idle_seconds=300)
        try:
            kept = await store.sweep(now=time.time() + 100)
            assert channel not in kept
            assert await store.exists(channel)
            swept = await store.sweep(now=time.time() + 301)
            return swept, await store.exists(channel)
        finally:
            await store.redis.aclose()

    swept, exists = asyncio.run(scenario())
    assert channel in swept
    assert not exists


def test_a_segment_records_why_it_ended(redis_server):
    """A preconnected publisher answers from the end entry: a close that lands between its
    ring check and its end check must still read as `closed` (Lp-Trickle-Closed), never as
    a plain finish."""
    finished, closed = make_channel(redis_server), make_channel(redis_server)

    async def scenario() -> list[bytes | None]:
        store = TrickleStore(AsyncRedis.from_url(redis_server.url))
        try:
            for channel in (finished, closed):
                assert await store.open_write(channel, 0) == 0
            still_open = await store.end_reason(finished, 0)
            await store.end_segment(finished, 0, DONE)
            await store.close(closed)
            return [still_open, await store.end_reason(finished, 0),
                    await store.end_reason(closed, 0)]  # fmt: skip
        finally:
            await store.redis.aclose()

    assert asyncio.run(scenario()) == [None, DONE, CLOSED]


def _read_head(sock: socket.socket) -> bytes:
    """One response head (status line and headers) from a raw HTTP/1.1 socket."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {head!r}"
        head += byte
    return head


def preconnect(proxy: ProxyServer, channel: str, seq: int, timeout: float) -> socket.socket:
    """A publisher's POST of a chunked segment, headers sent and no body byte yet."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.sendall(
        f"POST /ai/trickle/{channel}/{seq} HTTP/1.1\r\nHost: x\r\nContent-Type: video/MP2T\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    return sock


SILENCE = 3.0  # seconds a preconnected publisher sends nothing in the tests below


def _nothing_arrives(sock: socket.socket, seconds: float) -> None:
    """Assert the server sends nothing (no interim response, no answer, no close) for
    `seconds`."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return
    finally:
        sock.settimeout(25)
    raise AssertionError(f"the server spoke to a silent publisher: {data!r}")


def test_a_publisher_silent_before_its_first_byte_is_held_until_it_writes(replicas, redis_server):
    """A preconnected publisher (trickle_publisher.go opens seq+1 before it has bytes for
    it) keeps its request open, unanswered, for as long as it is silent; its first bytes
    then go out as segment 0. go-livepeer also sends `100 Continue` every 10 s meanwhile;
    Kubepeer does not (ASGI has no message for it on HTTP/1.1: DESIGN.md, "Trickle")."""
    proxy, _ = replicas
    channel = make_channel(redis_server)
    sock = preconnect(proxy, channel, 0, timeout=25)
    try:
        _nothing_arrives(sock, SILENCE)
        sock.sendall(b"5\r\nhello\r\n0\r\n\r\n")
        final = _read_head(sock)
        assert final.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
        assert b"lp-trickle-seq: 0" in final.lower()
    finally:
        sock.close()
    with httpx.Client(timeout=10) as client:
        assert client.get(url(proxy, channel, 0)).content == b"hello"


def test_a_silent_http2_publisher_is_held_on_its_stream_too(replicas, redis_server):
    """The same over HTTP/2 (h2c here, by prior knowledge): the stream stays open and
    unanswered until the publisher's first DATA frame."""
    proxy, _ = replicas
    channel = make_channel(redis_server)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=25)
    try:
        sock.sendall(conn.data_to_send())
        path = f"/ai/trickle/{channel}/0"
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", path),
                              (":authority", "x"), ("content-type", "video/MP2T")])  # fmt: skip
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + SILENCE
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            assert data, "connection closed"
            for event in conn.receive_data(data):  # the server's settings and acks only
                assert not isinstance(event, (h2.events.InformationalResponseReceived,
                                              h2.events.ResponseReceived,
                                              h2.events.StreamReset)), event  # fmt: skip
            sock.sendall(conn.data_to_send())
        sock.settimeout(25)
        conn.send_data(1, b"hello", end_stream=True)
        sock.sendall(conn.data_to_send())
        final: dict[bytes, bytes] = {}
        while not final:
            data = sock.recv(65536)
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    final = dict(event.headers)
            sock.sendall(conn.data_to_send())
        assert final[b":status"] == b"200"
        assert final[b"lp-trickle-seq"] == b"0"
    finally:
        sock.close()
    with httpx.Client(timeout=10) as client:
        assert client.get(url(proxy, channel, 0)).content == b"hello"


def test_lp_trickle_reset_ends_earlier_segments_and_keeps_later_ones(replicas, redis_server):
    """gateway-wire 5.2: `Lp-Trickle-Reset` on a POST closes the older segments (a
    restarted publisher's unfinished one), unblocking their readers."""
    writer, reader = replicas
    channel = make_channel(redis_server)

    async def scenario() -> tuple[bytes, bytes, dict]:
        gate = asyncio.Event()  # the first publisher sends a little of 0, then hangs
        async with httpx.AsyncClient(timeout=20) as client:
            hung = asyncio.ensure_future(
                client.post(url(writer, channel, 0), content=_chunks([b"partial", b"!"], gate))
            )
            await asyncio.sleep(0.5)
            on_zero = asyncio.ensure_future(client.get(url(reader, channel, 0)))
            on_one = asyncio.ensure_future(client.get(url(reader, channel, 1)))  # precreated
            await asyncio.sleep(1.0)
            assert not on_zero.done()  # segment 0 is still open: its publisher may go on
            restarted = await client.post(
                url(writer, channel, 1), content=b"fresh", headers={"Lp-Trickle-Reset": "1"}
            )
            zero = await asyncio.wait_for(on_zero, 10)
            one = await asyncio.wait_for(on_one, 10)
            gate.set()
            await asyncio.wait_for(hung, 10)
            assert restarted.status_code == 200
            return zero.content, one.content, dict(one.headers)

    zero, one, headers = asyncio.run(scenario())
    assert zero == b"partial"  # ended by the reset, with what it had
    assert one == b"fresh"  # the segment the reset came with is not closed
    assert headers["lp-trickle-seq"] == "1"


def test_lp_trickle_reset_releases_a_publisher_preconnected_to_an_earlier_segment(
    replicas, redis_server
):
    """A segment the reset closes also lets go of the publisher waiting to write it: 200
    with `Connection: close`, as go-livepeer's closed segment does."""
    writer, _ = replicas
    channel = make_channel(redis_server)
    waiting = preconnect(writer, channel, 0, timeout=8)  # and it never sends a byte
    try:
        time.sleep(0.5)
        with httpx.Client(timeout=10) as client:
            restarted = client.post(
                url(writer, channel, 1), content=b"fresh", headers={"Lp-Trickle-Reset": "1"}
            )
        assert restarted.status_code == 200
        head = _read_head(waiting).lower()  # released at once, not kept
    finally:
        waiting.close()
    assert head.split(b"\r\n")[0] == b"http/1.1 200 ok"
    assert b"connection: close" in head
    assert b"lp-trickle-seq: 0" in head
    assert b"lp-trickle-closed" not in head  # the channel itself goes on
