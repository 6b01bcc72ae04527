"""The recipient's side: the secret behind recipientRand, and the ticket params we hand out.

recipientRand is never stored per gateway: it is re-derived from the params a payment
echoes back, with a 32-byte secret every proxy replica shares (from a Kubernetes Secret).
A gateway that alters any param gets a different recipientRand, whose hash then fails
to match the recipientRandHash it was given.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from kubepeer.payments.ticket import MAX_WIN_PROB, aux_data, minimal_bytes, recipient_rand_hash

SECRET_BYTES = 32
REDEEM_GAS_L2 = 1_200_000
TX_COST_MULTIPLIER = 100  # a winning ticket must pay for its redemption this many times over
EV_MULTIPLIER = 100  # ... and be worth at least this many tickets' EV
DEFAULT_TICKET_EV = 8_000_000_000  # wei
EXPIRATION_BLOCKS = 40


class RecipientSecret:
    """32 random bytes; shown as [redacted] so it never reaches a log."""

    def __init__(self, value: bytes) -> None:
        if len(value) != SECRET_BYTES:
            raise ValueError(f"the recipient secret must be {SECRET_BYTES} bytes, got {len(value)}")
        self._value = value

    @classmethod
    def from_file(cls, path: Path) -> RecipientSecret:
        """Read the secret from a file mounted from a Kubernetes Secret (raw or hex)."""
        raw = path.read_bytes()
        if len(raw) == SECRET_BYTES:
            return cls(raw)  # raw bytes: any byte may be whitespace, so strip nothing
        try:
            return cls(bytes.fromhex(raw.decode().strip()))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(
                f"{path} must hold {SECRET_BYTES} raw bytes or {2 * SECRET_BYTES} hex digits"
            ) from None

    @classmethod
    def generate(cls) -> RecipientSecret:
        return cls(secrets.token_bytes(SECRET_BYTES))

    def mac(self, message: bytes) -> bytes:
        return hmac.new(self._value, message, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "RecipientSecret([redacted])"


@dataclass(frozen=True)
class IssuedParams:
    """What went into a recipientRand: every field the gateway must echo unchanged."""

    seed: bytes
    sender: bytes
    face_value: int
    win_prob: int
    expiration_block: int
    price_per_unit: int
    pixels_per_unit: int
    aux_data: bytes


def recipient_rand(secret: RecipientSecret, p: IssuedParams) -> int:
    message = (
        p.seed
        + p.sender
        + minimal_bytes(p.face_value)
        + minimal_bytes(p.win_prob)
        + minimal_bytes(p.expiration_block)
        + minimal_bytes(p.price_per_unit)
        + minimal_bytes(p.pixels_per_unit)
        + p.aux_data
    )
    return int.from_bytes(secret.mac(message), "big")


@dataclass(frozen=True)
class TicketParams:
    recipient: bytes
    face_value: int
    win_prob: int
    recipient_rand_hash: bytes
    seed: bytes
    expiration_block: int
    creation_round: int = 0
    creation_round_block_hash: bytes = b"\x00" * 32


def face_value_for(gas_price: int, ev: int, max_float: int | None = None) -> int:
    """Big enough that redeeming a winner is worth its gas, small enough for the sender."""
    face = max(REDEEM_GAS_L2 * gas_price * TX_COST_MULTIPLIER, ev * EV_MULTIPLIER)
    if max_float is not None:
        face = min(face, max_float)
    return face


def win_prob_for(face_value: int, ev: int) -> int:
    if face_value <= 0:
        raise ValueError("face value must be positive")
    return min(MAX_WIN_PROB, ev * math.ceil(MAX_WIN_PROB / face_value))


def issue_ticket_params(
    secret: RecipientSecret,
    recipient: bytes,
    sender: bytes,
    latest_block: int,
    gas_price: int,
    price: tuple[int, int],
    creation_round: int = 0,
    creation_round_block_hash: bytes = b"\x00" * 32,
    ev: int = DEFAULT_TICKET_EV,
    max_float: int | None = None,
) -> TicketParams:
    """Params for one gateway, priced to make a winning ticket worth redeeming."""
    face = face_value_for(gas_price, ev, max_float)
    return ticket_params(
        secret,
        recipient,
        sender,
        face_value=face,
        win_prob=win_prob_for(face, ev),
        expiration_block=latest_block + EXPIRATION_BLOCKS,
        price=price,
        creation_round=creation_round,
        creation_round_block_hash=creation_round_block_hash,
    )


def ticket_params(
    secret: RecipientSecret,
    recipient: bytes,
    sender: bytes,
    *,
    face_value: int,
    win_prob: int,
    expiration_block: int,
    price: tuple[int, int],
    creation_round: int = 0,
    creation_round_block_hash: bytes = b"\x00" * 32,
) -> TicketParams:
    """Params with a fresh seed, committed to by the recipientRand they imply."""
    issued = IssuedParams(
        seed=secrets.token_bytes(32),
        sender=sender,
        face_value=face_value,
        win_prob=win_prob,
        expiration_block=expiration_block,
        price_per_unit=price[0],
        pixels_per_unit=price[1],
        aux_data=aux_data(creation_round, creation_round_block_hash),
    )
    return TicketParams(
        recipient=recipient,
        face_value=face_value,
        win_prob=win_prob,
        recipient_rand_hash=recipient_rand_hash(recipient_rand(secret, issued)),
        seed=issued.seed,
        expiration_block=expiration_block,
        creation_round=creation_round,
        creation_round_block_hash=creation_round_block_hash,
    )
