"""The reverse proxy from a Live Runner session to its app replica (live-runner-wire.md 5.1).

As go-livepeer's `httputil.ReverseProxy` with its Rewrite hook: the path is the replica's
base path joined with the app path, the raw query copied, method, body and end-to-end
headers forwarded; hop-by-hop headers and the client's `Forwarded`/`X-Forwarded-*` dropped,
none added; the four session headers set over anything the client sent. The answer's
status, headers and body come back as the app sends them, each chunk as it arrives (SSE).
WebSocket sessions are relayed message by message (`relay_websocket`).

`upstream_url` and `upstream_headers` are pure; the rest moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp

log = logging.getLogger("kubepeer.proxy.liverunner")

# RFC 9110 7.6.1's hop-by-hop fields, and those Go's ReverseProxy also drops; Host is set
# to the replica's by the client library.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
})  # fmt: skip
SESSION_HEADERS = ("livepeer-runner-route", "livepeer-session-id", "livepeer-session-token",
                   "livepeer-session-control")  # fmt: skip
# What a WebSocket handshake carries that the client library makes anew upstream.
_WEBSOCKET_OWN = frozenset({"sec-websocket-key", "sec-websocket-version",
                            "sec-websocket-extensions", "sec-websocket-accept"})  # fmt: skip


@dataclass(frozen=True)
class SessionHeaders:
    """The four headers a replica is given on every proxied request (live-runner-wire.md 5.1)."""

    route: str
    session_id: str
    token: str
    control_url: str  # <runner-facing base>/runner/<route>/session/<sid>

    def pairs(self) -> list[tuple[str, str]]:
        return [("Livepeer-Runner-Route", self.route), ("Livepeer-Session-Id", self.session_id),
                ("Livepeer-Session-Token", self.token),
                ("Livepeer-Session-Control", self.control_url)]  # fmt: skip


def upstream_url(base: str, app_path: str, query: str) -> str:
    """`base`'s scheme and host; its path joined with `app_path` (decoded, cleaned, as Go's
    path.Join); the query as the client sent it."""
    parts = urlsplit(base)
    joined = posixpath.normpath(
        "/" + posixpath.join(parts.path.lstrip("/"), unquote(app_path).lstrip("/"))
    )
    if joined.startswith("//"):  # normpath keeps a leading '//' (POSIX): Go's Clean does not
        joined = "/" + joined.lstrip("/")
    if app_path.endswith("/") and not joined.endswith("/"):
        joined += "/"  # Go's joinURLPath keeps the request's trailing slash
    path = quote(joined, safe="/:@!$&'()*+,;=-._~")
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{query}" if query else "")


def upstream_headers(
    headers: Sequence[tuple[str, str]], session: SessionHeaders, websocket: bool = False
) -> list[tuple[str, str]]:
    """The client's end-to-end headers (names lowercased), without hop-by-hop ones and the
    session headers it may have sent, then the session's own."""
    dropped = HOP_BY_HOP | set(SESSION_HEADERS) | (_WEBSOCKET_OWN if websocket else set())
    connection = {t.strip() for n, v in headers if n == "connection" for t in v.lower().split(",")}
    kept = [(n, v) for n, v in headers if n not in dropped and n not in connection]
    return kept + session.pairs()


def downstream_headers(headers: Mapping[str, str] | Any) -> list[tuple[bytes, bytes]]:
    """The app's response headers for the client, without hop-by-hop ones: the server
    frames the body itself (a Content-Length stays: the body passes through undecoded)."""
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP
    ]


class Upstream:
    """The proxy's client to app replicas: no cookies, no redirects followed, bodies passed
    through undecoded. Made in the running loop (`open`), closed with the proxy."""

    def __init__(self, connect_timeout: float = 2.0) -> None:
        self.connect_timeout = connect_timeout
        self._http: aiohttp.ClientSession | None = None

    def open(self) -> None:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "opened in the proxy's lifespan"
        return self._http

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, url: str, headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:  # fmt: skip
        """The app's answer at its head; raises aiohttp.ClientError when the replica could not
        be reached or broke the answer's head."""
        async with self.http.request(
            method, url, headers=headers, data=body, allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        ) as response:  # fmt: skip
            yield response


async def relay_websocket(
    upstream: Upstream, url: str, headers: list[tuple[str, str]], receive: Any, send: Any,
    subprotocols: Sequence[str],
) -> None:  # fmt: skip
    """An ASGI WebSocket session relayed to the app: the app's handshake first (a refusal
    closes the client's with 1011 before accepting it), then messages both ways until either
    side closes; the close code passes through."""
    ws_url = "ws" + url.removeprefix("http")
    try:
        app = await upstream.http.ws_connect(
            ws_url, headers=headers, protocols=tuple(subprotocols),
            autoclose=False, autoping=True, max_msg_size=0,
        )  # fmt: skip
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("websocket to the app failed: %s", exc)
        await send({"type": "websocket.close", "code": 1011})
        return
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if app.protocol:
        accept["subprotocol"] = app.protocol
    await send(accept)

    async def client_to_app() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await app.close(code=message.get("code", 1000))
                return
            if message.get("bytes") is not None:
                await app.send_bytes(message["bytes"])
            elif message.get("text") is not None:
                await app.send_str(message["text"])

    async def app_to_client() -> None:
        async for message in app:
            if message.type is aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": message.data})
            elif message.type is aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": message.data})
            else:
                break
        await send({"type": "websocket.close", "code": app.close_code or 1000})

    tasks = [asyncio.ensure_future(client_to_app()), asyncio.ensure_future(app_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.close()
