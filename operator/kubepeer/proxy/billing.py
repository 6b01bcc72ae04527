"""The proxy's one door to payments: ticket params out, payments in, fees debited.

Everything the proxy needs from `kubepeer.payments` goes through `Billing`, so a change
in the payments code is a change here only. Checks follow go-livepeer's
`ProcessPayment` and `handleAIRequest` (gateway-wire 2.2, 3.1) with one addition: a
payment must claim a price we issued to that sender (go-livepeer trusts the claim when a
payment carries no tickets; the ticket HMAC binds the price only when it does).

Redis layout (beside the ledger's):
    kubepeer:issued-prices:{sender}   set of "num/den" prices quoted to the sender;
                                      expires ISSUED_PRICE_SECONDS after the last quote
    kubepeer:chain                    hash the chain watcher keeps: block, gas_price,
                                      round, round_block_hash (hex)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from redis import Redis

from kubepeer.livepeer import net_pb2
from kubepeer.payments.ledger import Ledger
from kubepeer.payments.recipient import (
    DEFAULT_TICKET_EV,
    RecipientSecret,
    issue_ticket_params,
)
from kubepeer.payments.ticket import minimal_bytes
from kubepeer.payments.validator import TicketRejected, validate_payment

ISSUED_PRICE_SECONDS = 3600  # a gateway echoes the price of its last discovery, up to ~30 min old
CHAIN_KEY = "kubepeer:chain"


class PaymentRefused(ValueError):
    """400 with this text: the payment credits nothing."""


@dataclass(frozen=True)
class ChainFacts:
    block: int
    gas_price: int
    round: int = 0
    round_block_hash: bytes = b"\x00" * 32


def read_chain_facts(redis: Redis) -> ChainFacts | None:
    raw = redis.hgetall(CHAIN_KEY)
    if not raw or b"block" not in raw:
        return None
    return ChainFacts(
        block=int(raw[b"block"]),
        gas_price=int(raw.get(b"gas_price", b"0")),
        round=int(raw.get(b"round", b"0")),
        round_block_hash=bytes.fromhex(
            raw.get(b"round_block_hash", b"").decode().removeprefix("0x")
        )
        or b"\x00" * 32,
    )


def write_chain_facts(redis: Redis, facts: ChainFacts) -> None:
    """What a chain watcher writes (tests and the dev chain use it too)."""
    redis.hset(
        CHAIN_KEY,
        mapping={
            "block": facts.block,
            "gas_price": facts.gas_price,
            "round": facts.round,
            "round_block_hash": facts.round_block_hash.hex(),
        },
    )


def price_key(price: tuple[int, int]) -> str:
    reduced = Fraction(price[0], price[1])
    return f"{reduced.numerator}/{reduced.denominator}"


def fee(units: int, price: net_pb2.PriceInfo) -> int:
    """DebitFees: units x pricePerUnit / pixelsPerUnit, in whole wei (rounded up: never owed)."""
    if price.pixels_per_unit <= 0:
        return 0
    return -(-units * price.price_per_unit // price.pixels_per_unit)


class Billing:
    def __init__(
        self,
        redis: Redis,
        recipient: bytes,
        secret: RecipientSecret,
        ticket_ev: int = DEFAULT_TICKET_EV,
    ) -> None:
        self.redis = redis
        self.recipient = recipient
        self.secret = secret
        self.ticket_ev = ticket_ev
        self.ledger = Ledger(redis)

    def chain(self) -> ChainFacts:
        facts = read_chain_facts(self.redis)
        if facts is None:
            raise PaymentRefused("chain facts unavailable: no block seen yet")
        return facts

    # -- discovery -------------------------------------------------------------------
    def ticket_params(self, sender: bytes, price: tuple[int, int]) -> net_pb2.TicketParams:
        facts = self.chain()
        params = issue_ticket_params(
            self.secret,
            self.recipient,
            sender,
            latest_block=facts.block,
            gas_price=facts.gas_price,
            price=price,
            creation_round=facts.round,
            creation_round_block_hash=facts.round_block_hash,
            ev=self.ticket_ev,
        )
        key = f"kubepeer:issued-prices:0x{sender.hex()}"
        pipe = self.redis.pipeline()
        pipe.sadd(key, price_key(price))
        pipe.expire(key, ISSUED_PRICE_SECONDS)
        pipe.execute()
        return net_pb2.TicketParams(
            recipient=params.recipient,
            face_value=minimal_bytes(params.face_value),
            win_prob=minimal_bytes(params.win_prob),
            recipient_rand_hash=params.recipient_rand_hash,
            seed=params.seed,
            expiration_block=minimal_bytes(params.expiration_block),
            expiration_params=net_pb2.TicketExpirationParams(
                creation_round=params.creation_round,
                creation_round_block_hash=params.creation_round_block_hash,
            ),
        )

    # -- a job -------------------------------------------------------------------------
    def issued(self, sender: bytes, price: net_pb2.PriceInfo) -> bool:
        if price.pixels_per_unit <= 0:
            return False
        key = f"kubepeer:issued-prices:0x{sender.hex()}"
        return bool(
            self.redis.sismember(key, price_key((price.price_per_unit, price.pixels_per_unit)))
        )

    def process(self, payment: net_pb2.Payment, manifest: str) -> None:
        """ProcessPayment: credit the tickets (if any) to (sender, manifest)."""
        price = payment.expected_price
        if not payment.HasField("expected_price") or price.pixels_per_unit <= 0:
            raise PaymentRefused("invalid expected price: pixelsPerUnit must be above 0")
        if price.price_per_unit < 0:
            raise PaymentRefused("invalid expected price: pricePerUnit is negative")
        if not self.issued(payment.sender, price):
            raise PaymentRefused(
                f"expected price {price.price_per_unit}/{price.pixels_per_unit} was never "
                "quoted to this sender"
            )
        if not payment.ticket_sender_params:
            return  # spending credit already on the ledger
        try:
            valid = validate_payment(payment, self.recipient, self.secret, self.chain().block)
            self.ledger.credit(valid, manifest)
        except TicketRejected as exc:
            if exc.reason == "expired":
                raise PaymentRefused(f"TicketParams expired: {exc}") from None
            if exc.reason == "replayed-nonce":
                raise PaymentRefused(f"invalid ticket senderNonce: {exc}") from None
            raise PaymentRefused(str(exc)) from None

    def sufficient_balance(self, payment: net_pb2.Payment, manifest: str) -> bool:
        if payment.expected_price.price_per_unit <= 0:
            return True
        # The ledger credits each ticket's EV rounded down to whole wei, so one honest
        # ticket may credit up to 1 wei below the EV it was issued for.
        return self.ledger.balance(payment.sender, manifest) >= self.ticket_ev - 1

    def debit(self, payment: net_pb2.Payment, manifest: str, units: int) -> int:
        """Charge a finished job at the payment's expected price; returns the fee."""
        charged = fee(units, payment.expected_price)
        if charged:
            self.ledger.debit(payment.sender, manifest, charged)
        return charged
