"""The ledger in Redis: credit a payment's expected value, debit job fees, refuse replays.

Every credit is one Lua script, so it is atomic across proxy replicas: the check that the
claimed price was offered, the nonce check, the nonce record, the balance increment and the
winning tickets' append to the stream happen together or not at all, in one round trip.
`Ledger` runs it on a blocking client (the payments tools, the tests), `AsyncLedger` on
redis.asyncio (the proxy); both build it and read its answer the same way (`_CreditCall`).

The balance is exact, as go-livepeer's big.Rat balance is: a ticket is worth
faceValue x winProb / maxWinProb wei, so every sum of ticket EVs is a whole number of wei
plus some k / maxWinProb. The whole wei live in an integer Redis can INCRBY and DECRBY
(fees are whole wei); the k, below maxWinProb, is added in the script with 32-bit limbs
(Lua numbers are doubles) and carries into the wei when it reaches a whole one. The
integer is therefore the exact balance rounded down, which is all a comparison with a
whole-wei threshold (the ticket EV) needs. Run Redis with `appendonly yes` and `appendfsync always`
so that an acknowledged credit survives a crash of Redis itself.

Layout (every key carries the hash tag `{pm}`, so on a Redis Cluster the keys one script
touches together live in one slot):
    kubepeer:{pm}:balance:<sender>:<manifest>   integer wei: the exact balance rounded down
                                                (EV credited minus fees debited)
    kubepeer:{pm}:balance:<sender>:<manifest>:fraction
                                                the rest, below one wei: 64 hex digits, the
                                                numerator over maxWinProb (2^256 - 1)
    kubepeer:{pm}:nonces:<recipientRandHash>    set of sender nonces seen (at most 600)
    kubepeer:{pm}:tickets:winning               stream of winning tickets, field `ticket`
    kubepeer:{pm}:prices:<sender>:<cap>_<model> prices offered to the sender for that
                                                capability and model: sorted set of
                                                "num/den", scored by when the offer lapses
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from prometheus_client import Counter
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import ResponseError

from kubepeer.payments.queue import WinningTicket
from kubepeer.payments.ticket import MAX_WIN_PROB
from kubepeer.payments.validator import TicketRejected, ValidPayment

TICKETS_RECEIVED = Counter("kubepeer_tickets_received_total", "Tickets credited to the ledger")
TICKETS_WINNING = Counter("kubepeer_tickets_winning_total", "Winning tickets queued to redeem")
# Every refusal, by TicketRejected's reason: counted where payments are judged (the proxy's
# Billing), so each is counted once, whichever check refused it.
TICKETS_REJECTED = Counter("kubepeer_tickets_rejected_total", "Payments refused", ["reason"])

MAX_NONCES_PER_RAND = 600
NONCE_TTL_SECONDS = 7 * 24 * 3600  # far past any params' expiration
# A gateway echoes the price of its last GetOrchestrator; go-livepeer forgets idle balances
# after 10 minutes, and so do we forget an offer.
PRICE_MEMORY_SECONDS = 600
PREFIX = "kubepeer:{pm}"
WINNING_STREAM = f"{PREFIX}:tickets:winning"

_CREDIT = """
-- KEYS: nonces, balance (whole wei), stream, balance fraction, prices offered
-- ARGV: max nonces, whole wei, nonce TTL, n, fraction (64 hex digits), price claimed
--       ("num/den"; empty: not checked here), now, n nonces, winners
if ARGV[6] ~= '' then
  local lapses = redis.call('ZSCORE', KEYS[5], ARGV[6])
  if not lapses or tonumber(lapses) < tonumber(ARGV[7]) then
    return redis.error_reply('unknown-price ' .. ARGV[6])
  end
end
local n = tonumber(ARGV[4])
if n == 0 then
  return redis.call('GET', KEYS[2]) or '0'
end
for i = 1, n do
  if redis.call('SISMEMBER', KEYS[1], ARGV[7 + i]) == 1 then
    return redis.error_reply('replayed-nonce ' .. ARGV[7 + i])
  end
end
if redis.call('SCARD', KEYS[1]) + n > tonumber(ARGV[1]) then
  return redis.error_reply('too-many-nonces')
end
for i = 1, n do
  redis.call('SADD', KEYS[1], ARGV[7 + i])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])

-- held + added fraction, both below 2^256 - 1, in eight 32-bit limbs (least significant
-- first): every intermediate stays an integer a double holds exactly.
local held = redis.call('GET', KEYS[4]) or string.rep('0', 64)
local added = ARGV[5]
local limb, carry, all_ones = {}, 0, true
for i = 57, 1, -8 do
  local sum = tonumber(string.sub(held, i, i + 7), 16)
    + tonumber(string.sub(added, i, i + 7), 16) + carry
  carry = math.floor(sum / 4294967296)
  limb[#limb + 1] = sum % 4294967296
  all_ones = all_ones and limb[#limb] == 4294967295
end
local whole = 0
if carry == 1 or all_ones then
  -- A whole wei: subtract 2^256 - 1, i.e. drop the carry and add one (all ones: zero).
  whole = 1
  local i = 1
  repeat
    limb[i] = (limb[i] + 1) % 4294967296
    i = i + 1
  until limb[i - 1] ~= 0 or i > 8
end
local hex = {}
for i = 8, 1, -1 do
  hex[#hex + 1] = string.format('%08x', limb[i])
end
redis.call('SET', KEYS[4], table.concat(hex))
redis.call('INCRBY', KEYS[2], ARGV[2])
if whole == 1 then
  redis.call('INCRBY', KEYS[2], 1)
end
for i = 8 + n, #ARGV do
  redis.call('XADD', KEYS[3], '*', 'ticket', ARGV[i])
end
-- GET, not INCRBY's reply: a Lua number is a double, exact only below 2^53 wei.
return redis.call('GET', KEYS[2])
"""


def balance_key(sender: bytes, manifest: str) -> str:
    return f"{PREFIX}:balance:0x{sender.hex()}:{manifest}"


def fraction_key(sender: bytes, manifest: str) -> str:
    return f"{balance_key(sender, manifest)}:fraction"


def nonces_key(recipient_rand_hash: bytes) -> str:
    return f"{PREFIX}:nonces:0x{recipient_rand_hash.hex()}"


def prices_key(sender: bytes, priced_for: str) -> str:
    return f"{PREFIX}:prices:0x{sender.hex()}:{priced_for}"


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes to pick its slot."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


def manifest_id(capability: int, model_id: str) -> str:
    """Balances are kept per sender and per "<capability>_<model>", as go-livepeer does."""
    return f"{capability}_{model_id}"


@dataclass(frozen=True)
class _CreditCall:
    """One run of the credit script: its keys and args, built from a judged payment, and
    its answer read back (the balance, or the refusal the script raised)."""

    keys: list[str]
    args: list[Any]
    tickets: int
    winners: int

    @classmethod
    def of(cls, payment: ValidPayment, manifest: str, stream: str, priced_for: str | None,
           now: float | None) -> _CreditCall:  # fmt: skip
        winners = [WinningTicket.from_accepted(t).to_json() for t in payment.tickets if t.winning]
        ev = payment.expected_value
        whole = ev.numerator // ev.denominator
        fraction = (ev - whole) * MAX_WIN_PROB  # an integer: every EV is k / maxWinProb
        price = payment.price
        claimed = "" if priced_for is None else f"{price.numerator}/{price.denominator}"
        args: list[Any] = [
            MAX_NONCES_PER_RAND, whole, NONCE_TTL_SECONDS, len(payment.nonces),
            f"{int(fraction):064x}", claimed, time.time() if now is None else now,
            *payment.nonces, *winners,
        ]  # fmt: skip
        keys = [
            nonces_key(payment.recipient_rand_hash),
            balance_key(payment.sender, manifest),
            stream,
            fraction_key(payment.sender, manifest),
            prices_key(payment.sender, priced_for or manifest),
        ]
        return cls(keys, args, len(payment.tickets), len(winners))

    def balance(self, reply: Any) -> int:
        TICKETS_RECEIVED.inc(self.tickets)
        TICKETS_WINNING.inc(self.winners)
        return int(reply)

    @staticmethod
    def refused(error: ResponseError) -> TicketRejected:
        reason, _, detail = str(error).partition(" ")
        if reason == "unknown-price":
            return TicketRejected(
                reason, f"expected price {Fraction(detail)} wei/unit was not offered to this "
                "sender for this job",
            )  # fmt: skip
        if reason == "replayed-nonce":
            return TicketRejected(reason, f"invalid ticket senderNonce: {detail} was already used")
        if reason == "too-many-nonces":
            return TicketRejected(
                reason, f"more than {MAX_NONCES_PER_RAND} tickets for one recipientRand"
            )
        raise error


def _sufficient(payment: ValidPayment, balance: int, ticket_ev: int) -> int:
    """go-livepeer's check that a job may run: with a non-zero price the balance (whole
    wei, rounded down: exact against the whole-wei `ticket_ev`) must reach one ticket's EV."""
    if payment.price > 0 and balance < ticket_ev:
        raise TicketRejected("insufficient-balance", "Insufficient balance")
    return balance


def _offer_commands(pipe: Any, sender: bytes, price: Fraction, priced_for: Iterable[str],
                    now: float | None) -> None:  # fmt: skip
    now = time.time() if now is None else now
    for key in (prices_key(sender, what) for what in priced_for):
        pipe.zadd(key, {f"{price.numerator}/{price.denominator}": now + PRICE_MEMORY_SECONDS})
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.expire(key, PRICE_MEMORY_SECONDS)


def _check_stream(stream: str) -> None:
    if hash_tag(stream) != hash_tag(PREFIX):
        raise ValueError(f"stream {stream!r} must carry the ledger's hash tag {PREFIX!r}")


class Ledger:
    """The ledger on a blocking Redis client."""

    def __init__(self, redis: Redis, stream: str = WINNING_STREAM) -> None:
        _check_stream(stream)
        self.redis = redis
        self.stream = stream
        self._credit = redis.register_script(_CREDIT)

    def credit(self, payment: ValidPayment, manifest: str, priced_for: str | None = None,
               now: float | None = None) -> int:  # fmt: skip
        """Credit every ticket's exact EV; queue the winners. Returns the new balance in
        whole wei, rounded down (`exact_balance` has the rest).

        Raises TicketRejected (and changes nothing) when any nonce was seen before, or, with
        `priced_for` ("<cap>_<model>"), when the payment's price was not offered to its
        sender for it. A payment without tickets credits nothing: the caller checks the
        balance covers the job."""
        call = _CreditCall.of(payment, manifest, self.stream, priced_for, now)
        try:
            return call.balance(self._credit(keys=call.keys, args=call.args))
        except ResponseError as exc:
            raise call.refused(exc) from None

    def admit(self, payment: ValidPayment, manifest: str, ticket_ev: int,
              priced_for: str | None = None) -> int:  # fmt: skip
        """Credit, then check the job may run as go-livepeer checks it (`_sufficient`).
        Returns the balance in whole wei; raises TicketRejected ('Insufficient balance',
        the text gateways know) when it does not cover one ticket's EV."""
        return _sufficient(payment, self.credit(payment, manifest, priced_for), ticket_ev)

    def debit(self, sender: bytes, manifest: str, fee: int) -> int:
        """Charge a job's fee; returns the balance left (negative means owed)."""
        return int(self.redis.decrby(balance_key(sender, manifest), fee))

    def balance(self, sender: bytes, manifest: str) -> int:
        """In whole wei, rounded down."""
        return int(self.redis.get(balance_key(sender, manifest)) or 0)

    def exact_balance(self, sender: bytes, manifest: str) -> Fraction:
        whole, fraction = self.redis.mget(
            balance_key(sender, manifest), fraction_key(sender, manifest)
        )
        return int(whole or 0) + Fraction(int(fraction or b"0", 16), MAX_WIN_PROB)

    def offer_price(self, sender: bytes, price: Fraction, priced_for: Iterable[str],
                    now: float | None = None) -> None:  # fmt: skip
        """Remember that `price` was offered to `sender` for each "<cap>_<model>" in
        `priced_for` (discovery's requested models), so a payment for a job on one of them
        may claim it for a while. A price quoted for nothing (a discovery without
        capabilities) is remembered for nothing: it admits no job."""
        pipe = self.redis.pipeline(transaction=True)
        _offer_commands(pipe, sender, price, priced_for, now)
        if len(pipe):
            pipe.execute()

    def offered_prices(self, sender: bytes, priced_for: str,
                       now: float | None = None) -> set[Fraction]:  # fmt: skip
        """The prices offered to `sender` for the capability and model `priced_for`."""
        now = time.time() if now is None else now
        members = self.redis.zrangebyscore(prices_key(sender, priced_for), now, "+inf")
        return {Fraction(m.decode()) for m in members}


class AsyncLedger:
    """The ledger on redis.asyncio, for the proxy: a job's credit is one round trip
    (`admit`), and its fee goes out with the job's other writes (`debit` into a pipeline)."""

    def __init__(self, redis: AsyncRedis, stream: str = WINNING_STREAM) -> None:
        _check_stream(stream)
        self.redis = redis
        self.stream = stream
        self._credit = redis.register_script(_CREDIT)

    async def credit(self, payment: ValidPayment, manifest: str,
                     priced_for: str | None = None) -> int:  # fmt: skip
        """`Ledger.credit`, awaited."""
        call = _CreditCall.of(payment, manifest, self.stream, priced_for, None)
        try:
            return call.balance(await self._credit(keys=call.keys, args=call.args))
        except ResponseError as exc:
            raise call.refused(exc) from None

    async def admit(self, payment: ValidPayment, manifest: str, ticket_ev: int,
                    priced_for: str | None = None) -> int:  # fmt: skip
        """`Ledger.admit`, awaited: one round trip."""
        return _sufficient(payment, await self.credit(payment, manifest, priced_for), ticket_ev)

    @staticmethod
    def debit(pipe: AsyncPipeline, sender: bytes, manifest: str, fee: int) -> None:
        """Queue a job's fee on `pipe` (sent with the job's other writes)."""
        pipe.decrby(balance_key(sender, manifest), fee)

    async def balance(self, sender: bytes, manifest: str) -> int:
        return int(await self.redis.get(balance_key(sender, manifest)) or 0)

    async def charge(self, sender: bytes, manifest: str, fee: int) -> int:
        """`Ledger.debit`, awaited: the balance left (negative means owed)."""
        return int(await self.redis.decrby(balance_key(sender, manifest), fee))

    async def was_offered(self, sender: bytes, priced_for: str, price: Fraction,
                          now: float | None = None) -> bool:  # fmt: skip
        """Whether `price` was offered to `sender` for `priced_for` and has not lapsed."""
        member = f"{price.numerator}/{price.denominator}"
        lapses = await self.redis.zscore(prices_key(sender, priced_for), member)
        return lapses is not None and lapses >= (time.time() if now is None else now)

    async def offer_price(self, sender: bytes, price: Fraction, priced_for: Iterable[str],
                          now: float | None = None) -> None:  # fmt: skip
        """`Ledger.offer_price`, awaited: one round trip."""
        pipe = self.redis.pipeline(transaction=True)
        _offer_commands(pipe, sender, price, priced_for, now)
        if len(pipe):
            await pipe.execute()
