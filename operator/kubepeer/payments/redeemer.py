"""The redeemer: winning tickets from the Redis stream to the TicketBroker.

One redeemer acts per recipient (see `lease.py`), and asks before every send whether it
still holds the Lease. Each ticket's state is persisted before each step (queue.py), and a
stream entry is acknowledged only once its ticket is redeemed or has failed for good, so a
crash at any point loses nothing; a signed transaction is persisted before it is sent and
re-broadcast rather than re-signed, so nothing is redeemed twice.

What happens to a ticket is decided by pure functions over what the chain says
(`revert_is_retryable`, `fees_for`, `bumped`, `redemptions_in`); the `Redeemer` only moves
data between Redis, web3 and them:
- not redeemable yet (params not expired, round not initialized, system paused, fees over
  the ceiling, not worth its gas now): deferred, the entry stays queued;
- refused for good (used, expired, bad signature, wrong block hash, ...): failed, with the
  contract's reason;
- ready: sent alone, or with other ready ones in one `batchRedeemWinningTickets`; each
  ticket's outcome and the amount actually paid are read from the broker's events;
- a transaction not mined within `stuck_after` is replaced at its nonce with fees bumped,
  never above the ceiling;
- an entry that cannot be parsed, or keeps raising, is parked with its error on
  `<stream>:parked` and acknowledged, so it cannot stop the tickets behind it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from eth_account.signers.local import LocalAccount
from prometheus_client import Counter
from redis import Redis
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import Timeout as RequestsTimeout
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound, Web3RPCError
from web3.logs import DISCARD

from kubepeer.livepeer.broker import TICKET_BROKER_ABI
from kubepeer.payments.ledger import WINNING_STREAM
from kubepeer.payments.queue import State, TicketBook, TicketRecord, WinningTicket
from kubepeer.payments.ticket import Ticket, recipient_rand_hash

log = logging.getLogger(__name__)

REDEEMED = Counter("kubepeer_tickets_redeemed_total", "Winning tickets redeemed on chain")
FAILED = Counter("kubepeer_tickets_failed_total", "Winning tickets given up on", ["reason"])
DEFERRED = Counter("kubepeer_tickets_deferred_total", "Redemptions put off", ["reason"])
PARKED = Counter("kubepeer_redeemer_parked_total", "Stream entries parked with their error")
WEI_EARNED = Counter("kubepeer_wei_earned_total", "Wei the broker paid for redeemed tickets")
GAS_SPENT = Counter("kubepeer_redeem_gas_spent_wei_total", "Wei spent on redemption gas")
REPLACED = Counter("kubepeer_redeem_tx_replaced_total", "Stuck transactions replaced")

# Reverts that a later block can undo; every other revert is the ticket's own fault.
RETRYABLE_REVERTS = ("current round is not initialized", "system is paused")
# The network or the RPC node, not the entry (an error answer from the node included, e.g.
# our account short of gas money): stop this pass and let the process back off.
TRANSPORT_ERRORS = (ConnectionError, TimeoutError, OSError, RequestsConnectionError,
                    RequestsTimeout, TimeExhausted, Web3RPCError)  # fmt: skip


def failpoint(name: str) -> None:
    """Crash here, hard, when KUBEPEER_FAILPOINT names this point (crash tests only)."""
    if os.environ.get("KUBEPEER_FAILPOINT") == name:
        log.warning("failpoint %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def revert_is_retryable(reason: str) -> bool:
    return any(text in reason for text in RETRYABLE_REVERTS)


@dataclass(frozen=True)
class Fees:
    """EIP-1559 fees for one transaction, wei per gas."""

    max_fee: int
    priority_fee: int


def fees_for(base_fee: int, ceiling: int, priority_fee: int, multiplier: int = 2) -> Fees | None:
    """Room for the base fee to rise `multiplier`-fold, never above the ceiling; None when
    even the current base fee plus the tip is over it (wait for cheaper blocks)."""
    if base_fee + priority_fee > ceiling:
        return None
    return Fees(min(ceiling, base_fee * multiplier + priority_fee), priority_fee)


def bumped(old: Fees, fresh: Fees | None, ceiling: int, percent: int) -> Fees | None:
    """Fees for a replacement at the same nonce: both raised by at least `percent` (nodes
    refuse a replacement that is not), at least what the current base fee asks, at most the
    ceiling. None when no such fees exist: keep waiting on the old transaction."""
    max_fee = -(-old.max_fee * (100 + percent) // 100)
    priority = -(-old.priority_fee * (100 + percent) // 100)
    if fresh is not None:
        max_fee, priority = max(max_fee, fresh.max_fee), max(priority, fresh.priority_fee)
    if max_fee > ceiling or priority > max_fee:
        return None
    return Fees(max_fee, priority)


def redemptions_in(redeemed: Sequence[Any], transfers: Sequence[Any]) -> dict[bytes, int]:
    """Ticket hash -> wei paid, from a receipt's decoded WinningTicketRedeemed and
    WinningTicketTransfer events. The broker emits a ticket's Transfer (only when it paid
    something) right before its Redeemed, from the same sender to the same recipient."""
    paid_at = {(t.logIndex, t.args.sender, t.args.recipient): t.args.amount for t in transfers}
    outcome = {}
    for event in redeemed:
        args = event.args
        aux = bytes(args.auxData)
        ticket = Ticket(
            recipient=bytes.fromhex(args.recipient[2:]),
            sender=bytes.fromhex(args.sender[2:]),
            face_value=args.faceValue,
            win_prob=args.winProb,
            sender_nonce=args.senderNonce,
            recipient_rand_hash=recipient_rand_hash(args.recipientRand),
            creation_round=int.from_bytes(aux[:32], "big"),
            creation_round_block_hash=aux[32:64],
        )
        outcome[ticket.hash] = paid_at.get((event.logIndex - 1, args.sender, args.recipient), 0)
    return outcome


@dataclass(frozen=True)
class RedeemerSettings:
    stream: str = WINNING_STREAM
    group: str = "redeemer"
    consumer: str = "redeemer-0"
    # Arbitrum One's base fee sits at 0.01 gwei and rarely leaves 0.1: 1 gwei lets
    # redemptions ride out a spike and refuses a runaway one.
    max_fee_per_gas: int = 10**9
    priority_fee: int = 0  # Arbitrum orders first come, first served: a tip buys nothing
    fee_bump_percent: int = 15
    stuck_after: float = 30.0  # seconds unmined before the transaction is replaced
    confirmations: int = 1
    receipt_timeout: float = 300.0
    batch_size: int = 8
    max_attempts: int = 5  # then the entry is parked


class Deferred(Exception):
    """Not now: leave the ticket queued and try again later."""


class LeaseLost(Exception):
    """Another redeemer may act now: send nothing more."""


@dataclass(frozen=True)
class Ready:
    winning: WinningTicket
    gas: int
    entry_id: bytes


class Redeemer:
    def __init__(
        self,
        redis: Redis,
        w3: Web3,
        broker_address: str,
        account: LocalAccount,
        settings: RedeemerSettings | None = None,
        l1_block: Callable[[], int] | None = None,
        may_send: Callable[[], bool] = lambda: True,
    ) -> None:
        self.redis, self.w3, self.account = redis, w3, account
        self.settings = settings or RedeemerSettings()
        self.broker = w3.eth.contract(address=broker_address, abi=TICKET_BROKER_ABI)
        self.book = TicketBook(redis)
        self.chain_id = w3.eth.chain_id
        self.l1_block = l1_block or (lambda: w3.eth.block_number)
        self.may_send = may_send
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(
                self.settings.stream, self.settings.group, id="0", mkstream=True
            )
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- the loop ---

    def run_once(self, block_ms: int = 0) -> int:
        """Handle what is queued: first entries this consumer read before (a restart), then
        new ones. Returns how many tickets reached a final state. Raises LeaseLost when the
        Lease went, and the transport errors that mean the RPC or Redis is away."""
        # Only the Lease holder runs this: whatever another consumer read and left unfinished
        # (a replica that lost the Lease, or died) is ours now.
        self.redis.xautoclaim(self.settings.stream, self.settings.group, self.settings.consumer,
                              min_idle_time=0, start_id="0-0", count=10_000)  # fmt: skip
        entries = self._read(block_ms)
        finished = 0
        tickets: dict[bytes, tuple[bytes, WinningTicket]] = {}
        for entry_id, fields in entries:
            winning = self._parse(entry_id, fields)
            if winning is None:
                continue
            if winning.hash in tickets:  # the same ticket queued twice: one entry carries it
                self._ack(entry_id)
                continue
            tickets[winning.hash] = (entry_id, winning)
        # Submitted transactions first, a whole batch at a time, as they were sent.
        groups: dict[int, list[tuple[bytes, WinningTicket]]] = {}
        ready: list[Ready] = []
        for key, (entry_id, winning) in tickets.items():
            record = self.book.get(key)
            if record is not None and record.state is State.SUBMITTED:
                groups.setdefault(record.tx_nonce, []).append((entry_id, winning))
        for group in groups.values():
            finished += self._guarded(group, lambda g=group: self._settle(g))
        settled = {w.hash for group in groups.values() for _, w in group}
        for key, (entry_id, winning) in tickets.items():
            if key in settled:
                continue
            finished += self._guarded(
                [(entry_id, winning)], lambda e=entry_id, w=winning: self._prepare(e, w, ready)
            )
        for chunk in _chunks(ready, self.settings.batch_size):
            group = [(r.entry_id, r.winning) for r in chunk]
            finished += self._guarded(group, lambda c=chunk: self._redeem(c))
        return finished

    def _read(self, block_ms: int) -> list[tuple[bytes, dict]]:
        entries = []
        for start in ("0", ">"):
            response = self.redis.xreadgroup(
                self.settings.group,
                self.settings.consumer,
                {self.settings.stream: start},
                count=100,
                block=block_ms if start == ">" and block_ms > 0 else None,  # 0 = forever
            )
            for _stream, batch in response or []:
                entries.extend(batch)
        return entries

    def _parse(self, entry_id: bytes, fields: dict) -> WinningTicket | None:
        if not fields:  # deleted from the stream meanwhile
            self._ack(entry_id)
            return None
        try:
            return WinningTicket.from_json(fields[b"ticket"])
        except Exception as exc:  # any malformation is the entry's, and permanent
            self._park(entry_id, fields, f"malformed entry: {exc!r}")
            return None

    def _guarded(self, group: list[tuple[bytes, WinningTicket]], step: Callable[[], int]) -> int:
        """Run one step; an unexpected error counts against each ticket involved and parks
        the entries that keep failing, instead of stopping the loop."""
        try:
            return step()
        except (LeaseLost, *TRANSPORT_ERRORS):
            raise
        except Exception as exc:
            log.exception("redeeming %d ticket(s) failed", len(group))
            for entry_id, winning in group:
                record = self.book.get(winning.hash) or TicketRecord(state=State.PENDING)
                attempts = record.attempts + 1
                self.book.put(winning.hash, replace(record, attempts=attempts, reason=repr(exc)))
                if attempts >= self.settings.max_attempts:
                    self._park(entry_id, {b"ticket": winning.to_json().encode()}, repr(exc))
            return 0

    def _park(self, entry_id: bytes, fields: dict, error: str) -> None:
        log.error("parking stream entry %s: %s", entry_id, error)
        parked = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        parked.update({"entry": entry_id, "error": error, "parked_at": str(time.time())})
        self.redis.xadd(f"{self.settings.stream}:parked", parked)
        self._ack(entry_id)
        PARKED.inc()

    def _ack(self, entry_id: bytes) -> None:
        self.redis.xack(self.settings.stream, self.settings.group, entry_id)

    # --- one ticket, before sending ---

    def _prepare(self, entry_id: bytes, winning: WinningTicket, ready: list[Ready]) -> int:
        """Final (1), deferred (0), or added to `ready` with its gas estimate (0)."""
        key = winning.hash
        record = self.book.get(key)
        if record is None:
            record = TicketRecord(state=State.PENDING)
            self.book.put(key, record)
        if record.state in (State.REDEEMED, State.FAILED):
            self._ack(entry_id)
            return 1
        if record.state is State.SUBMITTED:
            return 0  # settled above, or a transaction still on its way
        try:
            if self.l1_block() < winning.expiration_block:
                raise Deferred("params not expired yet")
            if self.broker.functions.usedTickets(key).call():
                return self._fail(entry_id, winning, "ticket is used")
            try:
                gas = self._redeem_call([winning]).estimate_gas({"from": self.account.address})
            except ContractLogicError as exc:
                reason = str(exc.message or exc)
                if revert_is_retryable(reason) or "revert" not in reason.lower():
                    # Some nodes wrap their own failures this way; only a revert is final.
                    raise Deferred(reason) from None
                return self._fail(entry_id, winning, f"reverts: {reason}")
        except Deferred as why:
            self._defer(winning, str(why))
            return 0
        ready.append(Ready(winning, gas, entry_id))
        return 0

    def _defer(self, winning: WinningTicket, why: str) -> None:
        DEFERRED.labels(why.split(":")[0][:60]).inc()
        log.info("deferred ticket 0x%s: %s", winning.hash.hex(), why)

    # --- sending ---

    def _redeem(self, chunk: Sequence[Ready]) -> int:
        fees = self._fees()
        if fees is None:
            for r in chunk:
                self._defer(r.winning, "fees over the ceiling")
            return 0
        worth = [r for r in chunk if self._worth_it(r, fees)]
        if not worth:
            return 0
        gas = int(sum(r.gas for r in worth) * 1.2)  # a batch costs less per ticket than this
        nonce = self.w3.eth.get_transaction_count(self.account.address, "pending")
        group = [(r.entry_id, r.winning) for r in worth]
        record = self._sign_and_send(group, fees, gas, nonce, previous=())
        return self._await(group, record)

    def _worth_it(self, ready: Ready, fees: Fees) -> bool:
        """Worth its gas at the fee we offer: what the broker would pay (face value, capped
        by the sender's deposit and our share of its reserve) above the cost."""
        ticket = ready.winning.ticket
        sender = Web3.to_checksum_address(ticket.sender)
        (deposit, _), _ = self.broker.functions.getSenderInfo(sender).call()
        share = self.broker.functions.claimableReserve(sender, self.account.address).call()
        payout = min(ticket.face_value, deposit + share)
        cost = ready.gas * fees.max_fee
        if payout <= cost:
            self._defer(ready.winning, f"uneconomic: pays {payout} wei, costs up to {cost} wei")
            return False
        return True

    def _fees(self) -> Fees | None:
        base = self.w3.eth.get_block("latest").get("baseFeePerGas", 0)
        s = self.settings
        return fees_for(base, s.max_fee_per_gas, s.priority_fee)

    def _redeem_call(self, tickets: Sequence[WinningTicket]):  # noqa: ANN202 - ContractFunction
        if len(tickets) == 1:
            [t] = tickets
            return self.broker.functions.redeemWinningTicket(
                t.ticket.abi_tuple(), t.sig, t.recipient_rand
            )
        return self.broker.functions.batchRedeemWinningTickets(
            [t.ticket.abi_tuple() for t in tickets],
            [t.sig for t in tickets],
            [t.recipient_rand for t in tickets],
        )

    def _sign_and_send(
        self,
        group: Sequence[tuple[bytes, WinningTicket]],
        fees: Fees,
        gas: int,
        nonce: int,
        previous: tuple[str, ...],
    ) -> TicketRecord:
        """Sign, record for every ticket in the group, then send (Lease permitting)."""
        if not self.may_send():
            raise LeaseLost("the Lease is no longer ours: not sending")
        tickets = [w for _, w in group]
        tx = self._redeem_call(tickets).build_transaction(
            {
                "from": self.account.address,
                "nonce": nonce,
                "gas": gas,
                "maxFeePerGas": fees.max_fee,
                "maxPriorityFeePerGas": fees.priority_fee,
                "chainId": self.chain_id,
            }
        )
        signed = self.account.sign_transaction(tx)
        record = TicketRecord(
            state=State.SUBMITTED,
            tx_hashes=(*previous, "0x" + bytes(signed.hash).hex()),
            tx_nonce=nonce,
            raw_tx="0x" + bytes(signed.raw_transaction).hex(),
            max_fee=fees.max_fee,
            priority_fee=fees.priority_fee,
            gas=gas,
            batch=tuple("0x" + w.hash.hex() for w in tickets),
        )
        for winning in tickets:
            old = self.book.get(winning.hash)
            self.book.put(winning.hash, replace(record, attempts=old.attempts if old else 0))
        if not self.may_send():
            raise LeaseLost("the Lease is no longer ours: not sending")
        failpoint("before-send")
        self._broadcast(record.raw_tx)
        failpoint("after-send")
        return record

    def _broadcast(self, raw_tx: str) -> None:
        try:
            self.w3.eth.send_raw_transaction(raw_tx)
        except Web3RPCError as exc:
            message = str(exc).lower()
            # Already in the pool, or its nonce is taken (by this very transaction, or by
            # its replacement): the receipts will tell.
            if not any(t in message for t in ("known", "nonce too low", "underpriced")):
                raise

    # --- after sending ---

    def _settle(self, group: list[tuple[bytes, WinningTicket]]) -> int:
        """After a restart: finish a transaction that was signed (and maybe sent)."""
        record = self.book.get(group[0][1].hash)
        confirmed = self.w3.eth.get_transaction_count(self.account.address, "latest")
        if self._mined(record) is None:
            if confirmed > record.tx_nonce:  # the nonce went to a transaction not ours to track
                for _, winning in group:
                    self.book.put(winning.hash, TicketRecord(state=State.PENDING))
                return 0
            if not self.may_send():
                raise LeaseLost("the Lease is no longer ours: not re-broadcasting")
            self._broadcast(record.raw_tx)
        return self._await(group, record)

    def _mined(self, record: TicketRecord) -> dict | None:
        for tx_hash in record.tx_hashes:
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                continue
        return None

    def _await(self, group: list[tuple[bytes, WinningTicket]], record: TicketRecord) -> int:
        """Wait for one of the group's transactions to be mined, replacing a stuck one with
        higher fees at the same nonce; then record each ticket's outcome."""
        deadline = time.monotonic() + self.settings.receipt_timeout
        sent_at = time.monotonic()
        while (receipt := self._mined(record)) is None:
            now = time.monotonic()
            if now > deadline:
                log.warning("transaction %s not mined yet; will look again", record.tx_hash)
                return 0
            if now - sent_at > self.settings.stuck_after:
                old = Fees(record.max_fee, record.priority_fee)
                fees = bumped(old, self._fees(), self.settings.max_fee_per_gas,
                              self.settings.fee_bump_percent)  # fmt: skip
                if fees is not None:
                    log.info("replacing stuck %s with max fee %d", record.tx_hash, fees.max_fee)
                    REPLACED.inc()
                    record = self._sign_and_send(
                        group, fees, record.gas, record.tx_nonce, record.tx_hashes
                    )
                sent_at = time.monotonic()
            time.sleep(0.2)
        self._await_confirmations(receipt["blockNumber"])
        failpoint("after-receipt")
        GAS_SPENT.inc(receipt["gasUsed"] * receipt.get("effectiveGasPrice", 0))
        paid = {}
        if receipt["status"] == 1:
            events = self.broker.events
            paid = redemptions_in(
                events.WinningTicketRedeemed().process_receipt(receipt, errors=DISCARD),
                events.WinningTicketTransfer().process_receipt(receipt, errors=DISCARD),
            )
        finished = 0
        for entry_id, winning in group:
            finished += self._outcome(entry_id, winning, record, receipt, paid)
        return finished

    def _outcome(
        self,
        entry_id: bytes,
        winning: WinningTicket,
        record: TicketRecord,
        receipt: dict,
        paid: dict[bytes, int],
    ) -> int:
        key = winning.hash
        mined = "0x" + bytes(receipt["transactionHash"]).hex()
        if key in paid:
            amount = paid[key]
            self.book.put(
                key, replace(record, state=State.REDEEMED, amount_paid=amount, tx_hashes=(mined,))
            )
            self._ack(entry_id)
            REDEEMED.inc()
            WEI_EARNED.inc(amount)
            log.info("redeemed ticket 0x%s: paid %d wei in %s", key.hex(), amount, mined)
            return 1
        # Not redeemed by this transaction (a batch skips a failing ticket; a lone one
        # reverted): back to pending, so the next pass asks the contract why.
        if self.broker.functions.usedTickets(key).call():
            return self._fail(entry_id, winning, "ticket is used (by another transaction)")
        old = self.book.get(key)
        attempts = (old.attempts if old else 0) + 1
        self.book.put(key, TicketRecord(state=State.PENDING, attempts=attempts,
                                        reason=f"not redeemed by {mined}"))  # fmt: skip
        if attempts >= self.settings.max_attempts:
            self._park(entry_id, {b"ticket": winning.to_json().encode()}, f"sent {attempts}x")
            return 1
        return 0

    def _fail(self, entry_id: bytes, winning: WinningTicket, reason: str) -> int:
        """Give up on a ticket for good, with the reason stored."""
        FAILED.labels(reason.split(":")[-1].strip()[:60]).inc()
        log.warning("ticket 0x%s failed: %s", winning.hash.hex(), reason)
        self.book.put(winning.hash, TicketRecord(state=State.FAILED, reason=reason))
        self._ack(entry_id)
        return 1

    def _await_confirmations(self, block: int) -> None:
        needed = block + self.settings.confirmations - 1
        deadline = time.monotonic() + self.settings.receipt_timeout
        while self.w3.eth.block_number < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"block {block} not confirmed {self.settings.confirmations}x")
            time.sleep(0.5)


def _chunks(items: Sequence[Ready], size: int) -> list[Sequence[Ready]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
