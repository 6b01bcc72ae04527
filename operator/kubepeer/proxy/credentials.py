"""Who is asking: gateway signatures, the auth token we hand out, and segment credentials. Pure.

Facts from gateway-wire.md:
- go-livepeer's `VerifySig(addr, msg, sig)` hashes msg with keccak256 and then checks a
  personal_sign (Ethereum text prefix) over that 32-byte digest; sig is 65 bytes, v in
  {27, 28}, s in the lower half of the curve order (1.2).
- Discovery signs the gateway's own EIP-55 checksummed address string (1.2); a job's
  `Livepeer-Segment` signs Flatten = manifestId | leftpad32(seq) | hash(32) | hex(profiles),
  profiles empty for AI (2.1).
- auth_token = HMAC-SHA256(secret, session_id || minimal big-endian expiration), valid
  30 minutes; every replica must share the secret (1.3).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address

from kubepeer.livepeer import net_pb2
from kubepeer.payments.ticket import minimal_bytes

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
AUTH_TOKEN_SECONDS = 30 * 60
AUTH_SECRET_MIN_BYTES = 16


def signed_by(address: bytes, message: bytes, sig: bytes) -> bool:
    """Whether `sig` is `address`'s personal_sign over keccak256(message), as go-livepeer checks."""
    if len(sig) != 65 or sig[64] not in (27, 28):
        return False
    s = int.from_bytes(sig[32:64], "big")
    if not 0 < s <= SECP256K1_N // 2:
        return False
    try:
        signer = Account.recover_message(encode_defunct(primitive=keccak(message)), signature=sig)
    except Exception:  # eth_keys raises several types for an unrecoverable point
        return False
    return bytes.fromhex(signer[2:]) == address


def go_address(raw: bytes) -> bytes:
    """go-ethereum's BytesToAddress: the last 20 bytes, left-padded with zeros."""
    return raw[-20:].rjust(20, b"\x00")


def discovery_signed(request: net_pb2.OrchestratorRequest) -> bool:
    address = go_address(request.address)
    return signed_by(address, to_checksum_address(address).encode(), request.sig)


def segment_flatten(seg: net_pb2.SegData) -> bytes:
    """What the gateway signed; profiles are empty for AI. big.Int.Bytes() drops the sign."""
    seq = abs(seg.seq).to_bytes(32, "big")
    return bytes(seg.manifest_id) + seq + bytes(seg.hash[-32:]).rjust(32, b"\x00")


class AuthSecret:
    """The HMAC key of auth tokens, from a Secret shared by every proxy replica."""

    def __init__(self, value: bytes) -> None:
        if len(value) < AUTH_SECRET_MIN_BYTES:
            raise ValueError(
                f"the auth token secret must be at least {AUTH_SECRET_MIN_BYTES} bytes"
            )
        self._value = value

    @classmethod
    def generate(cls) -> AuthSecret:
        return cls(secrets.token_bytes(32))

    def token(self, session_id: str, expiration: int) -> bytes:
        message = session_id.encode() + minimal_bytes(expiration)
        return hmac.new(self._value, message, hashlib.sha256).digest()

    def issue(self, now: float | None = None, session_id: str | None = None) -> net_pb2.AuthToken:
        """A token for `session_id` (default: a fresh one), valid AUTH_TOKEN_SECONDS."""
        session_id = session_id or secrets.token_hex(8)
        expiration = int(now if now is not None else time.time()) + AUTH_TOKEN_SECONDS
        return net_pb2.AuthToken(
            token=self.token(session_id, expiration), session_id=session_id, expiration=expiration
        )

    def __repr__(self) -> str:
        return "AuthSecret([redacted])"


class CredentialsRefused(ValueError):
    """403: the text is go-livepeer's, since gateways log and match it."""


@dataclass(frozen=True)
class SegmentCredentials:
    segment: net_pb2.SegData
    session_id: str


def check_segment(
    seg: net_pb2.SegData,
    sender: bytes,
    secret: AuthSecret,
    compatible: bool,
    now: float | None = None,
) -> SegmentCredentials:
    """verifySegCreds' checks after decoding, in its order (`compatible` is the capability
    check, made by the caller against what is served now)."""
    if not signed_by(sender, segment_flatten(seg), seg.sig):
        raise CredentialsRefused("ErrSegSig")
    if not compatible:
        raise CredentialsRefused("incompatible capabilities")
    check_auth_token(seg, secret, now)
    return SegmentCredentials(seg, seg.auth_token.session_id)


def check_auth_token(seg: net_pb2.SegData, secret: AuthSecret, now: float | None = None) -> None:
    """The segment carries an auth token we issued (at discovery) that has not expired."""
    if not seg.HasField("auth_token"):
        raise CredentialsRefused("missing auth token")
    token = seg.auth_token
    if not hmac.compare_digest(secret.token(token.session_id, token.expiration), token.token):
        raise CredentialsRefused("invalid auth token")
    if (now if now is not None else time.time()) > token.expiration:
        raise CredentialsRefused("expired auth token")
