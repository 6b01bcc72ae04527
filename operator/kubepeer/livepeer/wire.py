"""The Livepeer-Payment and Livepeer-Segment headers: base64 of protobuf messages."""

from __future__ import annotations

import base64
import binascii

from google.protobuf.message import DecodeError

from kubepeer.livepeer import net_pb2

PAYMENT_HEADER = "Livepeer-Payment"
SEGMENT_HEADER = "Livepeer-Segment"
AI_WORKER_AUTHORIZATION = "Livepeer-AI-Worker-1.0"


class BadHeader(ValueError):
    """A header that does not decode; the message names the header."""


def _decode(header: str, value: str, message: type) -> object:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadHeader(f"{header} is not valid base64: {exc}") from None
    decoded = message()
    try:
        decoded.ParseFromString(raw)
    except DecodeError as exc:
        raise BadHeader(f"{header} is not a valid {message.__name__}: {exc}") from None
    return decoded


def decode_payment(value: str) -> net_pb2.Payment:
    return _decode(PAYMENT_HEADER, value, net_pb2.Payment)


def decode_segment(value: str) -> net_pb2.SegData:
    return _decode(SEGMENT_HEADER, value, net_pb2.SegData)


def encode(message: object) -> str:
    return base64.b64encode(message.SerializeToString()).decode()
