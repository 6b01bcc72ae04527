"""Is a payment good? Every ticket checked before a wei is credited. Pure.

Replayed nonces are the one check this module cannot make alone: the ledger makes it,
atomically with the credit, because it needs what every proxy replica has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubepeer.livepeer import net_pb2
from kubepeer.payments.recipient import IssuedParams, RecipientSecret, recipient_rand
from kubepeer.payments.sender import SenderInfo, SenderUnfit, check_sender
from kubepeer.payments.ticket import (
    ZERO_ADDRESS,
    Ticket,
    aux_data,
    is_winning,
    recipient_rand_hash,
)


class TicketRejected(ValueError):
    """A payment that credits nothing; `reason` is a stable word, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    recipient_rand_hash: bytes
    expiration_block: int
    tickets: list[AcceptedTicket]

    @property
    def expected_value(self) -> int:
        return sum(t.ticket.expected_value for t in self.tickets)

    @property
    def nonces(self) -> list[int]:
        return [t.ticket.sender_nonce for t in self.tickets]


def _int(field: bytes) -> int:
    return int.from_bytes(field, "big")


def validate_payment(
    payment: net_pb2.Payment,
    recipient: bytes,
    secret: RecipientSecret,
    current_block: int,
    sender_info: SenderInfo | None = None,
) -> ValidPayment:
    params = payment.ticket_params
    if not payment.HasField("ticket_params"):
        raise TicketRejected("missing-params", "payment has no ticket params")
    if params.recipient != recipient:
        raise TicketRejected(
            "wrong-recipient", f"ticket recipient 0x{params.recipient.hex()} is not us"
        )
    sender = payment.sender
    if len(sender) != 20 or sender == ZERO_ADDRESS:
        raise TicketRejected("bad-sender", "sender must be a non-zero 20-byte address")
    expiration_block = _int(params.expiration_block)
    if expiration_block <= current_block:
        raise TicketRejected(
            "expired",
            f"ticket params expired at block {expiration_block} (now {current_block})",
        )
    if not payment.ticket_sender_params:
        raise TicketRejected("no-tickets", "payment carries no tickets")

    expiration = payment.expiration_params
    creation_round = expiration.creation_round
    block_hash = expiration.creation_round_block_hash or b"\x00" * 32
    aux = aux_data(creation_round, block_hash)
    face_value, win_prob = _int(params.face_value), _int(params.win_prob)
    rand = recipient_rand(
        secret,
        IssuedParams(
            seed=params.seed,
            sender=sender,
            face_value=face_value,
            win_prob=win_prob,
            expiration_block=expiration_block,
            price_per_unit=payment.expected_price.price_per_unit,
            pixels_per_unit=payment.expected_price.pixels_per_unit,
            aux_data=aux,
        ),
    )
    if recipient_rand_hash(rand) != params.recipient_rand_hash:
        raise TicketRejected(
            "wrong-recipient-rand",
            "recipientRandHash does not match the params we issued (altered or not ours)",
        )
    if sender_info is not None:
        try:
            check_sender(sender_info, face_value)
        except SenderUnfit as exc:
            raise TicketRejected("sender-unfit", str(exc)) from None

    accepted = []
    seen: set[int] = set()
    for sender_params in payment.ticket_sender_params:
        nonce = sender_params.sender_nonce
        if nonce in seen:
            raise TicketRejected("replayed-nonce", f"nonce {nonce} appears twice in one payment")
        seen.add(nonce)
        ticket = Ticket(
            recipient=recipient,
            sender=sender,
            face_value=face_value,
            win_prob=win_prob,
            sender_nonce=nonce,
            recipient_rand_hash=params.recipient_rand_hash,
            creation_round=creation_round,
            creation_round_block_hash=block_hash,
        )
        try:
            signer = ticket.signer(sender_params.sig)
        except ValueError as exc:
            raise TicketRejected("bad-signature", f"ticket {nonce}: {exc}") from None
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
        recipient_rand_hash=params.recipient_rand_hash,
        expiration_block=expiration_block,
        tickets=accepted,
    )
