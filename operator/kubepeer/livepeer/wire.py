"""The Livepeer-Payment and Livepeer-Segment headers: base64 of protobuf messages; addresses."""

from __future__ import annotations

import base64
import binascii

from google.protobuf.message import DecodeError

from kubepeer.livepeer import net_pb2

PAYMENT_HEADER = "Livepeer-Payment"
SEGMENT_HEADER = "Livepeer-Segment"
AI_WORKER_AUTHORIZATION = "Livepeer-AI-Worker-1.0"


# go-livepeer's orchestrator always sends a 20-byte `OrchestratorInfo.address`
# (server/rpc.go:getOrchestrator `orch.Address().Bytes()`): offchain, the zero address.
ZERO_ADDRESS = bytes(20)


def parse_address(text: str) -> bytes:
    """'0x' and 40 hex digits -> 20 bytes; a ValueError that quotes the value otherwise."""
    digits = text.removeprefix("0x").removeprefix("0X")
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        raw = b""
    if len(raw) != 20 or len(digits) != 40:
        raise ValueError(f"{text!r} is not an Ethereum address (0x and 40 hex digits)")
    return raw


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
