"""Steps 1 and 2 of a job: who may send it, judged on its headers alone (jobs.py).

With payments on, a job carries a `Livepeer-Payment` (402 when it does not decode) and a
`Livepeer-Segment` whose signature, auth token and capabilities we check (403). With
payments off, a private gateway presents the bearer token, or (`offchain_gateways`) an auth
token from our discovery, as an offchain go-livepeer takes it. Pure: the caller gives what
discovery offers now (`Offered`) and the secret the auth tokens are signed with.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.wire import (
    PAYMENT_HEADER,
    SEGMENT_HEADER,
    BadHeader,
    decode_payment,
    decode_segment,
)
from kubepeer.proxy import discovery
from kubepeer.proxy.credentials import (
    AuthSecret,
    CredentialsRefused,
    check_auth_token,
    check_segment,
)
from kubepeer.proxy.jobs import JobRefused

_PAYMENT, _SEGMENT = PAYMENT_HEADER.lower(), SEGMENT_HEADER.lower()  # headers by lowercased name


@dataclass(frozen=True)
class Door:
    """Who the proxy admits: its settings for steps 1 and 2, and the auth tokens' secret."""

    payments: bool
    auth_secret: AuthSecret
    bearer_token: str | None = None  # payments off: what a private gateway presents
    offchain_gateways: bool = False  # payments off: also an auth token from our discovery


def bearer_ok(headers: Mapping[str, str], token: str | None) -> bool:
    """Whether the request presents the private mode's bearer token (constant time)."""
    presented = headers.get("authorization", "").removeprefix("Bearer ")
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


def check_credentials(headers: Mapping[str, str], door: Door,
                      offered: discovery.Offered) -> net_pb2.Payment | None:  # fmt: skip
    """The job's payment (None with payments off), or JobRefused: 401 without the bearer
    token (payments off), 402 for a payment that does not decode, 403 for a segment whose
    credentials do not pass. `headers` by lowercased name."""
    if not door.payments:
        if bearer_ok(headers, door.bearer_token):
            return None
        if door.offchain_gateways and _offchain_ok(headers, door.auth_secret):
            return None
        raise JobRefused(401, "a valid bearer token is required")
    try:
        payment = decode_payment(headers.get(_PAYMENT, ""))
    except BadHeader as exc:
        raise JobRefused(402, str(exc)) from None
    try:
        seg = decode_segment(headers.get(_SEGMENT, ""))
    except BadHeader:
        raise JobRefused(403, "ErrorSegEncoding") from None
    try:
        compatible = discovery.compatible(seg.capabilities, offered)
        check_segment(seg, payment.sender, door.auth_secret, compatible)
    except CredentialsRefused as exc:
        raise JobRefused(403, str(exc)) from None
    return payment


def _offchain_ok(headers: Mapping[str, str], secret: AuthSecret) -> bool:
    try:
        check_auth_token(decode_segment(headers.get(_SEGMENT, "")), secret)
    except (BadHeader, CredentialsRefused):
        return False
    return True
