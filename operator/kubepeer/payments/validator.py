"""Is a payment good? Every ticket checked before a wei is credited. Pure.

The proxy's one entry point is `check_payment(header, context)`: it takes the raw
`Livepeer-Payment` header and what we know (our address and secret, the chain watcher's
view, the prices we issued to each sender) and *returns* either a `ValidPayment` or a
`TicketRejected` carrying a stable `reason`, an HTTP `status` and a message in go-livepeer's
words where a gateway reacts to them. It never raises on anything a gateway can send.

Only what the TicketBroker will honour is accepted: a low-s signature with v 27 or 28 by the
sender, params we issued to that sender (recipientRand is an HMAC over all of them, the
price, round and block hash included), not expired by L1 block or by round. Integers are
compared as integers, never as byte strings, because a gateway's big-integer code drops
leading zero bytes.

Replayed nonces are the one check this module cannot make alone: the ledger makes it,
atomically with the credit, because it needs what every proxy replica has seen. Whether
the balance covers the job (`Insufficient balance`) is the caller's check, after the
credit: a payment without tickets is valid and credits nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from fractions import Fraction

from eth_utils import to_checksum_address
from google.protobuf.message import DecodeError

from kubepeer.livepeer import net_pb2, wire
from kubepeer.payments.recipient import (
    EXPIRATION_BLOCKS,
    IssuedParams,
    RecipientSecret,
    recipient_rand,
)
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo, SenderUnfit, check_sender
from kubepeer.payments.ticket import (
    UINT256_LIMIT,
    ZERO_ADDRESS,
    BadSignature,
    Ticket,
    is_winning,
    recipient_rand_hash,
)

TICKET_VALIDITY_ROUNDS = 2  # the TicketBroker's ticketValidityPeriod on Arbitrum
# The watcher's L1 block may step back a little (another RPC node behind this one): params
# we issued a moment ago must not look as if they expire too far ahead.
EXPIRATION_SLACK_BLOCKS = 4


class TicketRejected(ValueError):
    """A payment that credits nothing. `reason` is a stable word (metrics, tests); the
    message says why, naming the field and value; `status` is the HTTP answer (402 when the
    header does not decode, else 400, as go-livepeer answers)."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status

    def __repr__(self) -> str:
        return f"TicketRejected({self.reason!r}, {str(self)!r})"


def _no_sender_info(_: bytes) -> SenderInfo | None:
    return None


@dataclass(frozen=True)
class PaymentContext:
    recipient: bytes  # our address, 20 bytes
    secret: RecipientSecret
    chain: ChainView
    # Prices we offered this sender recently for the job's own capability and model, in
    # lowest terms. A payment's claimed price must be one of them: without tickets nothing
    # else binds the claim, and with tickets recipientRand binds it to params we issued to
    # this sender, but not to what they were quoted for (a discovery for no model, or for
    # a cheaper one, would otherwise price this job). None: the caller has the ledger check
    # it, in the same script as the credit (`Ledger.credit`'s `priced_for`: one round trip).
    issued_prices: Callable[[bytes], Collection[Fraction]] | None
    # The TicketBroker's view of the sender (None: skip the check; the proxy's Billing
    # raises TicketRejected instead when the chain watcher has not read it).
    sender_info: Callable[[bytes], SenderInfo | None] = _no_sender_info


@dataclass(frozen=True)
class AcceptedTicket:
    ticket: Ticket
    sig: bytes
    recipient_rand: int
    winning: bool
    expiration_block: int


@dataclass(frozen=True)
class ValidPayment:
    sender: bytes
    price: Fraction  # the expected price, wei per unit, in lowest terms: what fees debit
    recipient_rand_hash: bytes = b""
    expiration_block: int = 0
    tickets: list[AcceptedTicket] = field(default_factory=list)

    @property
    def expected_value(self) -> Fraction:
        """In wei, exactly (a sum of go-livepeer's big.Rat ticket EVs)."""
        return sum((t.ticket.expected_value for t in self.tickets), Fraction(0))

    @property
    def nonces(self) -> list[int]:
        return [t.ticket.sender_nonce for t in self.tickets]


def check_payment(header: str, context: PaymentContext) -> ValidPayment | TicketRejected:
    """The proxy's entry point: a `Livepeer-Payment` header judged. Returns, never raises."""
    try:
        payment = wire.decode_payment(header)
    except (wire.BadHeader, DecodeError) as exc:
        return TicketRejected("undecodable", str(exc), status=402)
    try:
        return validate_payment(payment, context)
    except TicketRejected as rejected:
        return rejected


def validate_payment(payment: net_pb2.Payment, context: PaymentContext) -> ValidPayment:
    """Raises TicketRejected for anything the TicketBroker or our own terms would refuse."""
    sender = payment.sender
    if len(sender) != 20 or sender == ZERO_ADDRESS:
        raise TicketRejected(
            "bad-sender", f"sender must be a non-zero 20-byte address, got 0x{sender.hex()}"
        )
    price = claimed_price(payment.expected_price)
    if context.issued_prices is not None and price not in context.issued_prices(sender):
        raise TicketRejected(
            "unknown-price",
            f"expected price {price} wei/unit was not offered to this sender for this job",
        )
    if not payment.ticket_sender_params:
        # What a gateway sends while its credit with us covers the fee (gateway-wire 2.1).
        return ValidPayment(sender=sender, price=price)

    chain = context.chain
    if not chain.active:
        raise TicketRejected(
            "inactive",
            f"orchestrator is not active in round {chain.current_round}, cannot process payments",
        )
    if not payment.HasField("ticket_params"):
        raise TicketRejected("missing-params", "payment has tickets but no ticket params")
    params = payment.ticket_params
    if params.recipient != context.recipient:
        raise TicketRejected(
            "wrong-recipient", f"ticket recipient 0x{params.recipient.hex()} is not us"
        )
    face_value = _uint256("face_value", params.face_value)
    win_prob = _uint256("win_prob", params.win_prob)
    seed = _uint256("seed", params.seed)
    expiration_block = _uint256("expiration_block", params.expiration_block)
    rand_hash = _fixed("recipient_rand_hash", params.recipient_rand_hash, 32)
    expiration = payment.expiration_params
    creation_round = expiration.creation_round
    block_hash = _fixed(
        "creation_round_block_hash", expiration.creation_round_block_hash, 32, nonzero=True
    )
    _check_expiry(expiration_block, creation_round, block_hash, chain)

    rand = recipient_rand(
        context.secret,
        IssuedParams(
            seed=seed,
            sender=sender,
            face_value=face_value,
            win_prob=win_prob,
            expiration_block=expiration_block,
            price=price,
            creation_round=creation_round,
            creation_round_block_hash=block_hash,
        ),
    )
    if recipient_rand_hash(rand) != rand_hash:
        raise TicketRejected(
            "wrong-recipient-rand",
            "invalid recipientRand for ticket recipientRandHash: the params, price or round "
            "differ from those we issued to this sender",
        )
    info = context.sender_info(sender)
    if info is not None:
        try:
            check_sender(info, face_value, chain.creation_round, to_checksum_address(sender))
        except SenderUnfit as exc:
            raise TicketRejected("sender-unfit", str(exc)) from None

    accepted = []
    seen: set[int] = set()
    for sender_params in payment.ticket_sender_params:
        nonce = sender_params.sender_nonce
        if nonce in seen:
            raise TicketRejected(
                "replayed-nonce", f"invalid ticket senderNonce: {nonce} appears twice"
            )
        seen.add(nonce)
        ticket = Ticket(
            recipient=context.recipient,
            sender=sender,
            face_value=face_value,
            win_prob=win_prob,
            sender_nonce=nonce,
            recipient_rand_hash=rand_hash,
            creation_round=creation_round,
            creation_round_block_hash=block_hash,
        )
        try:
            signer = ticket.signer(sender_params.sig)
        except BadSignature as exc:
            raise TicketRejected(exc.reason, f"ticket {nonce}: {exc}") from None
        if signer != sender:
            raise TicketRejected(
                "bad-signature", f"ticket {nonce} is signed by 0x{signer.hex()}, not the sender"
            )
        accepted.append(
            AcceptedTicket(
                ticket=ticket,
                sig=sender_params.sig,
                recipient_rand=rand,
                winning=is_winning(sender_params.sig, rand, win_prob),
                expiration_block=expiration_block,
            )
        )
    return ValidPayment(
        sender=sender,
        price=price,
        recipient_rand_hash=rand_hash,
        expiration_block=expiration_block,
        tickets=accepted,
    )


def claimed_price(info: net_pb2.PriceInfo) -> Fraction:
    """A payment's expected price, in lowest terms (bad-price unless num >= 0 < den)."""
    num, den = info.price_per_unit, info.pixels_per_unit
    if num < 0 or den <= 0:
        raise TicketRejected(
            "bad-price", f"expected price must be >= 0 wei per unit over > 0 units, got {num}/{den}"
        )
    return Fraction(num, den)


def _uint256(name: str, raw: bytes) -> int:
    """A wire integer as a gateway's big.Int sends it: any leading zeros, at most 2^256 - 1."""
    value = int.from_bytes(raw, "big")
    if value >= UINT256_LIMIT:
        raise TicketRejected(
            f"bad-{name.replace('_', '-')}", f"{name} 0x{raw.hex()} does not fit in 256 bits"
        )
    return value


def _fixed(name: str, raw: bytes, size: int, nonzero: bool = False) -> bytes:
    if len(raw) != size or (nonzero and not any(raw)):
        what = "non-zero " if nonzero else ""
        raise TicketRejected(
            f"bad-{name.replace('_', '-')}",
            f"{name} must be {what}{size} bytes, got 0x{raw.hex()} ({len(raw)} bytes)",
        )
    return raw


def _check_expiry(
    expiration_block: int, creation_round: int, block_hash: bytes, chain: ChainView
) -> None:
    """Within the window we issue, and redeemable by round; "TicketParams expired" is the
    text a gateway answers by fetching fresh params rather than dropping us."""
    if expiration_block <= chain.l1_block:
        raise TicketRejected(
            "expired",
            f"TicketParams expired: expiration block {expiration_block}, now {chain.l1_block}",
        )
    if expiration_block > chain.l1_block + EXPIRATION_BLOCKS + EXPIRATION_SLACK_BLOCKS:
        raise TicketRejected(
            "bad-expiration-block",
            f"expiration block {expiration_block} is further ahead of {chain.l1_block} than "
            f"the {EXPIRATION_BLOCKS} blocks we issue",
        )
    if creation_round < 1 or creation_round > chain.current_round:
        raise TicketRejected(
            "bad-creation-round",
            f"creation round {creation_round} is not a round we issued (now {chain.current_round})",
        )
    if creation_round + TICKET_VALIDITY_ROUNDS <= chain.current_round:
        raise TicketRejected(
            "expired",
            f"TicketParams expired: creation round {creation_round}, now {chain.current_round}",
        )
    if creation_round == chain.creation_round and block_hash != chain.creation_round_block_hash:
        raise TicketRejected(
            "bad-creation-round-block-hash",
            f"creation_round_block_hash 0x{block_hash.hex()} is not round {creation_round}'s",
        )
