"""The recipient's side: the secret behind recipientRand, and the ticket params we hand out.

recipientRand is never stored per gateway: it is re-derived from the params a payment
echoes back, with a 32-byte secret every proxy replica shares (from a Kubernetes Secret).
A gateway that alters any param gets a different recipientRand, whose hash then fails
to match the recipientRandHash it was given. The HMAC covers the sender, so params issued
to one gateway are useless to another, and the price, so a payment's expected price is
bound to the one we issued with the params.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from kubepeer.livepeer import net_pb2
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.ticket import MAX_WIN_PROB, minimal_bytes, recipient_rand_hash, uint256

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
        self._keyed = hmac.new(value, digestmod=hashlib.sha256)  # copied per MAC: no re-keying

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
        mac = self._keyed.copy()
        mac.update(message)
        return mac.digest()

    def __repr__(self) -> str:
        return "RecipientSecret([redacted])"


@dataclass(frozen=True)
class IssuedParams:
    """What went into a recipientRand: every field the gateway must echo unchanged, as the
    integers they are (a gateway's big-integer code drops leading zero bytes)."""

    seed: int
    sender: bytes  # 20 bytes
    face_value: int
    win_prob: int
    expiration_block: int
    price: Fraction  # wei per unit, in lowest terms (as a gateway's big.Rat holds it)
    creation_round: int
    creation_round_block_hash: bytes  # 32 bytes


def recipient_rand(secret: RecipientSecret, p: IssuedParams) -> int:
    """HMAC over fixed-width fields, so no byte can move from one field to its neighbour.

    Only we compute it (the gateway sees its hash), so the encoding is ours to choose;
    every value must already be within its width (the validator checks before calling)."""
    message = b"".join(
        (
            uint256(p.seed),
            p.sender,
            uint256(p.face_value),
            uint256(p.win_prob),
            uint256(p.expiration_block),
            uint256(p.price.numerator),
            uint256(p.price.denominator),
            uint256(p.creation_round),
            p.creation_round_block_hash,
        )
    )
    return int.from_bytes(secret.mac(message), "big")


@dataclass(frozen=True)
class TicketParams:
    recipient: bytes
    face_value: int
    win_prob: int
    recipient_rand_hash: bytes
    seed: int
    expiration_block: int
    price: Fraction
    creation_round: int
    creation_round_block_hash: bytes


class InsufficientSenderReserve(ValueError):
    """No face value both worth redeeming and coverable by the sender: go-livepeer says
    "insufficient sender reserve" to the gateway rather than issue params it would refuse."""


def face_value_for(
    gas_price: int, ev: int, max_float: int | None = None, evs_per_win: int = EV_MULTIPLIER
) -> int:
    """Big enough that redeeming a winner is worth its gas, small enough for the sender.

    A winner is worth at least `evs_per_win` tickets' EV, so a ticket wins with probability
    at most 1/evs_per_win (a dev chain's demo lowers it to see winners after a few jobs).

    Raises InsufficientSenderReserve when the sender's max float leaves no face value above
    the ticket EV: such a ticket always wins, and gateways refuse it ('ticket faceValue too
    low', go-livepeer's sender checks EV < faceValue)."""
    if evs_per_win < 2:  # EV < faceValue, or gateways refuse the params
        raise ValueError(f"evs_per_win must be at least 2, got {evs_per_win}")
    face = max(REDEEM_GAS_L2 * gas_price * TX_COST_MULTIPLIER, ev * evs_per_win)
    if max_float is not None and max_float < face:
        face = max_float
    if ev <= 0 or face <= 0 or win_prob_for(face, ev) >= MAX_WIN_PROB:
        raise InsufficientSenderReserve(
            f"insufficient sender reserve: max float {max_float} wei cannot cover a ticket "
            f"with EV {ev} wei"
        )
    return face


def win_prob_for(face_value: int, ev: int) -> int:
    if face_value <= 0:
        raise ValueError("face value must be positive")
    # Integer ceil, as go-livepeer's DivMod: a float quotient loses all but 53 bits and can
    # round below, leaving a ticket worth less than the EV it was issued for.
    return min(MAX_WIN_PROB, ev * -(-MAX_WIN_PROB // face_value))


def issue_ticket_params(
    secret: RecipientSecret,
    recipient: bytes,
    sender: bytes,
    chain: ChainView,
    *,
    price: Fraction | tuple[int, int],
    gas_price: int | None = None,
    ev: int = DEFAULT_TICKET_EV,
    max_float: int | None = None,
    evs_per_win: int = EV_MULTIPLIER,
) -> TicketParams:
    """Params for one gateway, priced to make a winning ticket worth redeeming.

    They expire EXPIRATION_BLOCKS after the watcher's L1 block, carry its last initialized
    round and block hash, and cover its gas price unless `gas_price` says otherwise.
    Raises InsufficientSenderReserve (see face_value_for)."""
    gas = chain.gas_price if gas_price is None else gas_price
    face = face_value_for(gas, ev, max_float, evs_per_win)
    return ticket_params(
        secret,
        recipient,
        sender,
        face_value=face,
        win_prob=win_prob_for(face, ev),
        expiration_block=chain.l1_block + EXPIRATION_BLOCKS,
        price=price,
        creation_round=chain.creation_round,
        creation_round_block_hash=chain.creation_round_block_hash,
    )


def ticket_params(
    secret: RecipientSecret,
    recipient: bytes,
    sender: bytes,
    *,
    face_value: int,
    win_prob: int,
    expiration_block: int,
    price: Fraction | tuple[int, int],
    creation_round: int,
    creation_round_block_hash: bytes,
    seed: int | None = None,
) -> TicketParams:
    """Params with a fresh seed, committed to by the recipientRand they imply."""
    issued = IssuedParams(
        seed=secrets.randbits(256) if seed is None else seed,
        sender=sender,
        face_value=face_value,
        win_prob=win_prob,
        expiration_block=expiration_block,
        price=as_price(price),
        creation_round=creation_round,
        creation_round_block_hash=creation_round_block_hash,
    )
    return TicketParams(
        recipient=recipient,
        face_value=face_value,
        win_prob=win_prob,
        recipient_rand_hash=recipient_rand_hash(recipient_rand(secret, issued)),
        seed=issued.seed,
        expiration_block=expiration_block,
        price=issued.price,
        creation_round=creation_round,
        creation_round_block_hash=creation_round_block_hash,
    )


def as_price(price: Fraction | tuple[int, int]) -> Fraction:
    """A price in lowest terms (Fraction reduces), as the PriceInfo we advertise carries it."""
    if isinstance(price, Fraction):
        return price
    return Fraction(*price)


def ticket_params_message(params: TicketParams) -> net_pb2.TicketParams:
    """The params as `OrchestratorInfo.ticket_params` carries them to a gateway: integers
    as go-livepeer sends its big.Ints (big-endian, no leading zeros), the round and its
    block hash in `expiration_params`."""
    return net_pb2.TicketParams(
        recipient=params.recipient,
        face_value=minimal_bytes(params.face_value),
        win_prob=minimal_bytes(params.win_prob),
        recipient_rand_hash=params.recipient_rand_hash,
        seed=minimal_bytes(params.seed),
        expiration_block=minimal_bytes(params.expiration_block),
        expiration_params=net_pb2.TicketExpirationParams(
            creation_round=params.creation_round,
            creation_round_block_hash=params.creation_round_block_hash,
        ),
    )


def price_info(price: Fraction) -> net_pb2.PriceInfo:
    """A price as `PriceInfo` carries it: the reduced fraction (both fit int64 in practice;
    the operator refuses prices that do not)."""
    return net_pb2.PriceInfo(price_per_unit=price.numerator, pixels_per_unit=price.denominator)
