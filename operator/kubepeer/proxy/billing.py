"""The proxy's one door to payments: ticket params out, payments in, fees debited.

Everything the proxy needs from `kubepeer.payments` goes through `Billing`, so a change in
the payments code is a change here only. The payments code judges a payment
(`validate_payment`), credits it and checks the balance (`AsyncLedger.admit`), remembers
the prices offered to each sender for each capability and model (`offer_price`: every
payment must claim one offered for its job's own model, beyond go-livepeer, which trusts a
ticketless claim), issues params against the chain watcher's view of the chain
(`ChainFacts`: in memory, refreshed off the jobs' path), and judges senders by what the
TicketBroker holds for them, as the payments process's sender watch read it (`senders.py`:
the face value capped by the sender's max float, an unlocking sender's tickets refused).
Every refusal is counted by its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fractions import Fraction

from eth_utils import to_checksum_address
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline

from kubepeer.livepeer import net_pb2
from kubepeer.payments.ledger import TICKETS_REJECTED, AsyncLedger, manifest_id
from kubepeer.payments.recipient import (
    DEFAULT_TICKET_EV,
    EV_MULTIPLIER,
    REDEEM_GAS_L2,
    InsufficientSenderReserve,
    RecipientSecret,
    as_price,
    face_value_for,
    issue_ticket_params,
    ticket_params_message,
)
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo, max_float
from kubepeer.payments.validator import (
    PaymentContext,
    TicketRejected,
    ValidPayment,
    claimed_price,
    validate_payment,
)
from kubepeer.proxy.chain_facts import ChainFacts

ARBITRUM_GAS_PRICE = 10**7  # wei (0.01 gwei): what a winning ticket's redemption is sized for


def _unknown_sender(sender: bytes) -> str:
    """go-livepeer's words when it cannot read a sender (pm/sendermonitor.go)."""
    return (f"could not get sender info for {to_checksum_address(sender)}: the payments "
            "process has not read it from the TicketBroker")  # fmt: skip


class PaymentRefused(ValueError):
    """The payment credits nothing; `status` and the text are what the gateway gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _refused(rejected: TicketRejected) -> PaymentRefused:
    """A payment refused, whatever refused it, counted by its reason."""
    TICKETS_REJECTED.labels(rejected.reason).inc()
    return PaymentRefused(str(rejected), rejected.status)


def fee(units: int, price: Fraction) -> int:
    """DebitFees: units x price, in whole wei (rounded up: never less than owed)."""
    return -(-units * price.numerator // price.denominator)


# Refusals that come before the check that the price was offered, in go-livepeer's order and
# ours: no chain view (no params at all), the sender's address, the price's own form.
_BEFORE_THE_PRICE = frozenset({"no-chain-view", "bad-sender", "bad-price"})


class _NotCached(Exception):
    """A payment's sender has no facts in memory: read them, then judge it again."""


class Billing:
    """Payments for the proxy, on redis.asyncio. A paid job costs two round trips: its
    credit (`admit`: the price check, the nonces and the balance in one script) and its
    fee, queued by `debit` on the pipeline that also carries its results."""

    def __init__(
        self,
        redis: AsyncRedis,
        recipient: bytes,
        secret: RecipientSecret,
        *,
        facts: ChainFacts | None = None,
        ticket_ev: int = DEFAULT_TICKET_EV,
        gas_price: int = ARBITRUM_GAS_PRICE,
        evs_per_win: int = EV_MULTIPLIER,
        chain_max_age: float = 60.0,
        sender_wait: float = 3.0,
    ) -> None:
        self.redis = redis
        self.recipient = recipient
        self.secret = secret
        self.ticket_ev = ticket_ev
        self.gas_price = gas_price
        self.evs_per_win = evs_per_win
        self.facts = facts or ChainFacts(redis, chain_max_age)
        self.sender_wait = sender_wait  # seconds discovery waits for a new sender's facts
        self.ledger = AsyncLedger(redis)

    def chain(self) -> ChainView:
        view = self.facts.view()
        if view is None:
            raise TicketRejected(
                "no-chain-view", "no recent view of the chain: the chain watcher has stalled"
            )
        return view

    # -- senders -----------------------------------------------------------------------
    async def know_sender(self, sender: bytes) -> SenderInfo:
        """Before discovery answers a sender: its deposit and reserve as the payments
        process read them from the broker, asked for and awaited when not cached."""
        info = await self.facts.await_sender(sender, self.sender_wait)
        if info is None:
            raise PaymentRefused(_unknown_sender(sender))
        return info

    async def sender_facts(self, sender: bytes) -> SenderInfo:
        """The facts as the payments process read them (never a chain read here); refused
        when it has none."""
        info = await self.facts.sender(sender)
        if info is None:
            raise TicketRejected("sender-unknown", _unknown_sender(sender))
        return info

    # -- discovery -------------------------------------------------------------------
    async def ticket_params(
        self, sender: bytes, price: tuple[int, int], priced_for: Iterable[tuple[int, str]]
    ) -> net_pb2.TicketParams:
        """Params at `price`, the price offered for each (capability, model) of `priced_for`,
        their face value capped by the sender's max float as go-livepeer caps it (a sender
        with no reserve for us gets "insufficient sender reserve")."""
        return await self.params_for(sender, price, [manifest_id(c, m) for c, m in priced_for])

    async def params_for(
        self, sender: bytes, price: tuple[int, int], offered: list[str]
    ) -> net_pb2.TicketParams:
        """`ticket_params` with the price offered for ledger keys `offered` (a Live Runner
        app's is `app_key(route)`)."""
        try:
            info = await self.sender_facts(sender)
            params = issue_ticket_params(
                self.secret, self.recipient, sender, self.chain(),
                gas_price=self.gas_price, price=price, ev=self.ticket_ev,
                evs_per_win=self.evs_per_win, max_float=max_float(info),
            )  # fmt: skip
        except (TicketRejected, InsufficientSenderReserve) as exc:  # no params: no payment
            raise PaymentRefused(str(exc)) from None
        await self.ledger.offer_price(sender, as_price(price), offered)
        return ticket_params_message(params)

    def tx_cost_share(self) -> Fraction:
        """1/txCostMultiplier for AutoAdjustPrice: what redeeming a winning ticket costs
        (redeemGas x gas price) over the face value our params carry when the sender's
        max float does not lower it. The same for every sender: for one whose reserve
        allocation lowers its face value the share is understated (go-livepeer's is per
        sender), which only errs toward the configured price."""
        try:
            face = face_value_for(self.gas_price, self.ticket_ev, evs_per_win=self.evs_per_win)
        except InsufficientSenderReserve as exc:
            raise PaymentRefused(str(exc)) from None
        return Fraction(REDEEM_GAS_L2 * self.gas_price, face)

    # -- a job -------------------------------------------------------------------------
    def _context(self, sender_info: Callable[[bytes], SenderInfo]) -> PaymentContext:
        # The price offered is the ledger's check (`issued_prices=None`): in its script.
        return PaymentContext(recipient=self.recipient, secret=self.secret, chain=self.chain(),
                              issued_prices=None, sender_info=sender_info)  # fmt: skip

    async def _judged(self, payment: net_pb2.Payment, priced_for: str) -> ValidPayment:
        try:
            return await self._validated(payment)
        except TicketRejected as exc:
            if exc.reason not in _BEFORE_THE_PRICE:
                await self._offered(payment, priced_for)
            raise

    async def _validated(self, payment: net_pb2.Payment) -> ValidPayment:
        """Every check but the price offered and the nonces (the ledger's script makes
        those), against the chain view and the sender's facts held in memory. The facts are
        read from Redis only for tickets that pass every other check (params we issued to
        this sender): nobody makes the proxy read, or ask the payments process about, a
        sender by sending tickets it did not earn."""
        facts = self.facts

        def cached(sender: bytes) -> SenderInfo:
            info = facts.cached(sender)
            if info is None:
                raise _NotCached
            return info

        try:
            return validate_payment(payment, self._context(cached))
        except _NotCached:
            pass
        info = await facts.sender(payment.sender)

        def read(sender: bytes) -> SenderInfo:
            if info is None:
                raise TicketRejected("sender-unknown", _unknown_sender(sender))
            return info

        return validate_payment(payment, self._context(read))

    async def admit(
        self, payment: net_pb2.Payment, manifest: str, priced_for: str, *, priced: bool
    ) -> ValidPayment:
        """ProcessPayment and the balance check (gateway-wire 2.2 steps 5 and 6) for a job on
        the capability and model `priced_for` ("<cap>_<model>"): the claimed price must be
        one we offered this sender for it, and never zero while the model is `priced`."""
        try:
            valid = await self._judged(payment, priced_for)
            if priced and valid.price == 0:
                await self._offered(payment, priced_for)
                raise TicketRejected(
                    "unknown-price", f"expected price 0 wei/unit is not the price of {priced_for}"
                )
            await self.ledger.admit(valid, manifest, self.ticket_ev, priced_for)
        except TicketRejected as exc:
            raise _refused(exc) from None
        return valid

    async def _offered(self, payment: net_pb2.Payment, priced_for: str) -> None:
        """Refuse a payment already refused for a later reason, or about to be, in the
        words of the first rule it breaks when that is the price offered (go-livepeer's
        order, and ours before the check moved into the ledger's script): a refusal's path,
        so this read is never on a paying job's way."""
        price = claimed_price(payment.expected_price)
        if not await self.ledger.was_offered(payment.sender, priced_for, price):
            raise TicketRejected(
                "unknown-price",
                f"expected price {price} wei/unit was not offered to this sender for this job",
            )

    async def credit(self, payment: net_pb2.Payment, manifest: str,
                     priced_for: str) -> ValidPayment:  # fmt: skip
        """ProcessPayment alone: a live stream's interval payment (`POST /payment`)."""
        try:
            valid = await self._judged(payment, priced_for)
            await self.ledger.credit(valid, manifest, priced_for)
        except TicketRejected as exc:
            raise _refused(exc) from None
        return valid

    @staticmethod
    def debit(pipe: AsyncPipeline, payment: ValidPayment, manifest: str, units: int) -> int:
        """Queue a finished job's fee at the payment's expected price on `pipe`; returns it."""
        charged = fee(units, payment.price)
        if charged:
            AsyncLedger.debit(pipe, payment.sender, manifest, charged)
        return charged
