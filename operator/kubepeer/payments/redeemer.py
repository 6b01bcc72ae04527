"""The redeemer: winning tickets from the Redis stream to `redeemWinningTicket` on chain.

One redeemer acts per recipient (see `lease.py`). Each ticket's state is persisted before
each step (queue.py), and a stream entry is acknowledged only once its ticket is redeemed
or has failed for good, so a crash at any point loses nothing; a signed transaction is
persisted before it is sent and re-broadcast rather than re-signed, and the contract's
`usedTickets` is consulted before any send, so nothing is redeemed twice.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, replace

from eth_account.signers.local import LocalAccount
from prometheus_client import Counter
from redis import Redis
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError

from kubepeer.livepeer.broker import TICKET_BROKER_ABI
from kubepeer.payments.ledger import WINNING_STREAM
from kubepeer.payments.queue import State, TicketBook, TicketRecord, WinningTicket

log = logging.getLogger(__name__)

REDEEMED = Counter("kubepeer_tickets_redeemed_total", "Winning tickets redeemed on chain")
FAILED = Counter("kubepeer_tickets_failed_total", "Winning tickets given up on", ["reason"])
DEFERRED = Counter("kubepeer_tickets_deferred_total", "Redemptions put off", ["reason"])
WEI_EARNED = Counter("kubepeer_wei_earned_total", "Face value of redeemed tickets, in wei")
GAS_SPENT = Counter("kubepeer_redeem_gas_spent_wei_total", "Wei spent on redemption gas")


def failpoint(name: str) -> None:
    """Crash here, hard, when KUBEPEER_FAILPOINT names this point (crash tests only)."""
    if os.environ.get("KUBEPEER_FAILPOINT") == name:
        log.warning("failpoint %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class RedeemerSettings:
    stream: str = WINNING_STREAM
    group: str = "redeemer"
    consumer: str = "redeemer-0"
    redeem_gas: int = 1_200_000
    max_gas_price: int = 100 * 10**9  # wei; above it, redemptions wait
    confirmations: int = 1
    receipt_timeout: float = 120.0


class Deferred(Exception):
    """Not now: leave the ticket queued and try again later."""


class Redeemer:
    def __init__(
        self,
        redis: Redis,
        w3: Web3,
        broker_address: str,
        account: LocalAccount,
        settings: RedeemerSettings | None = None,
    ) -> None:
        self.redis, self.w3, self.account = redis, w3, account
        self.settings = settings or RedeemerSettings()
        self.broker = w3.eth.contract(address=broker_address, abi=TICKET_BROKER_ABI)
        self.book = TicketBook(redis)
        self.chain_id = w3.eth.chain_id
        self._nonce: int | None = None
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
        new ones. Returns how many tickets reached a final state."""
        finished = 0
        for start in ("0", ">"):
            response = self.redis.xreadgroup(
                self.settings.group,
                self.settings.consumer,
                {self.settings.stream: start},
                count=100,
                block=block_ms if start == ">" and block_ms > 0 else None,  # 0 = forever
            )
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    if not fields:  # deleted from the stream meanwhile
                        self._ack(entry_id)
                        continue
                    try:
                        if self.handle(WinningTicket.from_json(fields[b"ticket"])):
                            self._ack(entry_id)
                            finished += 1
                    except Deferred as why:
                        DEFERRED.labels(str(why)).inc()
                        log.info("deferred ticket in entry %s: %s", entry_id, why)
        return finished

    def _ack(self, entry_id: bytes) -> None:
        self.redis.xack(self.settings.stream, self.settings.group, entry_id)

    # --- one ticket ---

    def handle(self, winning: WinningTicket) -> bool:
        """Move one ticket on as far as it can go now; True once it is final."""
        key = winning.hash
        record = self.book.get(key)
        if record is None:
            record = TicketRecord(state=State.PENDING)
            self.book.put(key, record)
        if record.state in (State.REDEEMED, State.FAILED):
            return True
        if record.state is State.SUBMITTED and self._settle_submitted(winning, record):
            return True

        if self.w3.eth.block_number < winning.expiration_block:
            raise Deferred("params not expired yet")
        if self.broker.functions.usedTickets(key).call():
            return self._fail(winning, "ticket already used")
        gas_price = self.w3.eth.gas_price
        if gas_price > self.settings.max_gas_price:
            raise Deferred(f"gas price {gas_price} wei is over the ceiling")
        tx_cost = gas_price * self.settings.redeem_gas
        funds = self._sender_funds(winning.ticket.sender)
        if winning.ticket.face_value <= tx_cost or funds <= tx_cost:
            return self._fail(
                winning, "not worth its gas: face value or sender funds below tx cost", "uneconomic"
            )

        call = self._redeem_call(winning)
        try:
            gas = call.estimate_gas({"from": self.account.address})
        except ContractLogicError as exc:
            # The contract refuses it as it stands ("ticket already used", "ticket
            # creationRound does not have a block hash", "ticket did not win", ...): final.
            return self._fail(winning, f"reverts: {exc.message or exc}")
        tx = call.build_transaction(
            {
                "from": self.account.address,
                "nonce": self._next_nonce(),
                "gas": int(gas * 1.2),
                "chainId": self.chain_id,
            }
        )
        signed = self.account.sign_transaction(tx)
        record = TicketRecord(
            state=State.SUBMITTED,
            tx_hash="0x" + bytes(signed.hash).hex(),
            tx_nonce=tx["nonce"],
            raw_tx="0x" + bytes(signed.raw_transaction).hex(),
        )
        self.book.put(key, record)
        failpoint("before-send")
        self.w3.eth.send_raw_transaction(signed.raw_transaction)
        failpoint("after-send")
        return self._finish(winning, record)

    def _settle_submitted(self, winning: WinningTicket, record: TicketRecord) -> bool:
        """After a restart: finish a ticket whose transaction was signed, from its receipt if
        it was mined, else by re-broadcasting that very transaction. False: the transaction
        can never be mined and the ticket is still unused, so it must be sent afresh."""
        if self._receipt(record.tx_hash) is None:
            try:
                self.w3.eth.send_raw_transaction(record.raw_tx)
            except Web3RPCError as exc:
                message = str(exc).lower()
                if "nonce" in message:  # its nonce went to another transaction
                    self._nonce = None
                    if self.broker.functions.usedTickets(winning.hash).call():
                        return self._fail(winning, "ticket already used")
                    return False
                if "known" not in message:  # "already known": it is in the pool; wait
                    raise
        return self._finish(winning, record)

    def _finish(self, winning: WinningTicket, record: TicketRecord) -> bool:
        receipt = self.w3.eth.wait_for_transaction_receipt(
            record.tx_hash, timeout=self.settings.receipt_timeout
        )
        self._await_confirmations(receipt["blockNumber"])
        failpoint("after-receipt")
        if receipt["status"] != 1:
            return self._fail(winning, f"transaction {record.tx_hash} reverted")
        cost = receipt["gasUsed"] * receipt.get("effectiveGasPrice", 0)
        self.book.put(winning.hash, replace(record, state=State.REDEEMED))
        REDEEMED.inc()
        WEI_EARNED.inc(winning.ticket.face_value)
        GAS_SPENT.inc(cost)
        log.info(
            "redeemed ticket 0x%s for %d wei in %s", winning.hash.hex(), winning.ticket.face_value,
            record.tx_hash,
        )  # fmt: skip
        return True

    def _fail(self, winning: WinningTicket, reason: str, kind: str = "non-retryable") -> bool:
        """Give up on a ticket for good; `kind` labels the metric (non-retryable, uneconomic)."""
        FAILED.labels(kind).inc()
        log.warning("ticket 0x%s failed: %s", winning.hash.hex(), reason)
        self.book.put(winning.hash, TicketRecord(state=State.FAILED, reason=reason))
        return True

    # --- chain helpers ---

    def _redeem_call(self, winning: WinningTicket):  # noqa: ANN202 - a web3 ContractFunction
        return self.broker.functions.redeemWinningTicket(
            winning.ticket.abi_tuple(), winning.sig, winning.recipient_rand
        )

    def _sender_funds(self, sender: bytes) -> int:
        info, reserve = self.broker.functions.getSenderInfo(Web3.to_checksum_address(sender)).call()
        return info[0] + reserve[0]

    def _next_nonce(self) -> int:
        if self._nonce is None:
            self._nonce = self.w3.eth.get_transaction_count(self.account.address, "pending")
        nonce, self._nonce = self._nonce, self._nonce + 1
        return nonce

    def _receipt(self, tx_hash: str) -> dict | None:
        try:
            return self.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None

    def _await_confirmations(self, block: int) -> None:
        needed = block + self.settings.confirmations - 1
        deadline = time.monotonic() + self.settings.receipt_timeout
        while self.w3.eth.block_number < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"block {block} not confirmed {self.settings.confirmations}x")
            time.sleep(0.5)
