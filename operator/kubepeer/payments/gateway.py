"""The gateway's side of a payment: sign tickets against an orchestrator's params.

Kubepeer is an orchestrator; this exists so tests, benchmarks and the demo can pay it
the way a real Livepeer gateway does. Like go-livepeer's sender, it sends every integer as
Go's big.Int.Bytes() does: big-endian with no leading zero bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction

from kubepeer.livepeer import net_pb2
from kubepeer.payments.recipient import (
    TicketParams,
    price_info,
    ticket_params_message,
)
from kubepeer.payments.ticket import Ticket


def sign_payment(
    params: TicketParams,
    sender_key: bytes,
    sender: bytes,
    nonces: Iterable[int],
    price: Fraction | tuple[int, int] | None = None,
) -> net_pb2.Payment:
    """A Payment carrying one signed ticket per nonce, echoing the params we were given
    (and the price they were issued with, unless `price` says otherwise)."""
    offered = ticket_params_message(params)
    expiration = offered.expiration_params
    offered.ClearField("expiration_params")  # a gateway sends them beside, not inside
    payment = net_pb2.Payment(
        ticket_params=offered,
        sender=sender,
        expiration_params=expiration,
        expected_price=_claimed(params.price if price is None else price),
    )
    for nonce in nonces:
        ticket = Ticket(
            recipient=params.recipient,
            sender=sender,
            face_value=params.face_value,
            win_prob=params.win_prob,
            sender_nonce=nonce,
            recipient_rand_hash=params.recipient_rand_hash,
            creation_round=params.creation_round,
            creation_round_block_hash=params.creation_round_block_hash,
        )
        payment.ticket_sender_params.append(
            net_pb2.TicketSenderParams(sender_nonce=nonce, sig=ticket.sign(sender_key))
        )
    return payment


def ticketless_payment(sender: bytes, price: Fraction | tuple[int, int]) -> net_pb2.Payment:
    """What a gateway sends while its credit with us still covers the fee: no tickets."""
    return net_pb2.Payment(sender=sender, expected_price=_claimed(price))


def _claimed(price: Fraction | tuple[int, int]) -> net_pb2.PriceInfo:
    """The expected price a gateway claims; a pair is sent as given (reduced or not)."""
    if isinstance(price, Fraction):
        return price_info(price)
    return net_pb2.PriceInfo(price_per_unit=price[0], pixels_per_unit=price[1])
