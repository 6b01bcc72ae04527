"""Unary gRPC over the proxy's own HTTP/2 server: 5-byte framing and a grpc-status trailer.

go-livepeer serves gRPC and HTTP on one port by handing HTTP/2 requests whose
content-type starts with `application/grpc` to its gRPC server (gateway-wire 1.1). We
serve the one unary method gateways call the same way, in the ASGI app, so one TLS
listener carries both. A message is `flag(1) | length(4, big-endian) | bytes`; the status
travels in trailers (ASGI's `http.response.trailers` extension).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

OK = 0
UNKNOWN = 2
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

CONTENT_TYPE = "application/grpc"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # grpc-go's default receive limit

Method = Callable[[bytes], Awaitable[bytes]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class GrpcError(Exception):
    """A call that ends with a non-OK status; the message reaches the client as grpc-message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def unframe(body: bytes) -> bytes:
    """The one message of a unary request body."""
    if len(body) < 5:
        raise GrpcError(INVALID_ARGUMENT, f"request body of {len(body)} bytes has no gRPC frame")
    compressed, length = struct.unpack(">BI", body[:5])
    if compressed:
        raise GrpcError(UNIMPLEMENTED, "compressed messages are not supported")
    if len(body) != 5 + length:
        raise GrpcError(
            INVALID_ARGUMENT, f"frame says {length} bytes, body carries {len(body) - 5}"
        )
    return body[5:]


def encode_grpc_message(text: str) -> str:
    """grpc-message is percent-encoded: printable ASCII except '%' passes through."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def is_grpc(scope: Scope) -> bool:
    if scope["type"] != "http" or scope.get("http_version") != "2":
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.startswith(CONTENT_TYPE.encode())
    return False


async def serve_unary(
    scope: Scope, receive: Receive, send: Send, methods: dict[str, Method]
) -> None:
    body = bytearray()
    status, reply = OK, b""
    try:
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            body += event.get("body", b"")
            if len(body) > MAX_MESSAGE_BYTES + 5:
                raise GrpcError(RESOURCE_EXHAUSTED, f"message larger than {MAX_MESSAGE_BYTES}")
            if not event.get("more_body", False):
                break
        method = methods.get(scope["path"])
        if method is None:
            raise GrpcError(UNIMPLEMENTED, f"unknown method {scope['path']}")
        reply = frame(await method(unframe(bytes(body))))
        message = ""
    except GrpcError as exc:
        status, message = exc.code, exc.message
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", CONTENT_TYPE.encode())],
            "trailers": True,
        }
    )
    await send({"type": "http.response.body", "body": reply, "more_body": False})
    trailers = [(b"grpc-status", str(status).encode())]
    if message:
        trailers.append((b"grpc-message", encode_grpc_message(message).encode()))
    await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})
