"""Payments end to end on real servers: Redis ledger, Hardhat dev chain, redeemer process."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import redis as redis_lib
from eth_account import Account
from eth_account.signers.local import LocalAccount

from conftest import REPO, free_port
from devchain import ETH, DevChain
from kubepeer.livepeer import wire
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.ledger import WINNING_STREAM, Ledger, balance_key, manifest_id
from kubepeer.payments.queue import State, TicketBook, WinningTicket
from kubepeer.payments.recipient import EXPIRATION_BLOCKS, RecipientSecret, ticket_params
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.ticket import MAX_WIN_PROB
from kubepeer.payments.validator import PaymentContext, TicketRejected, ValidPayment, check_payment
from support import wait_for

pytestmark = [pytest.mark.chain, pytest.mark.redis]

MANIFEST = manifest_id(27, "org/model")
PRICE = Fraction(1000, 1)
PASSWORD = "correct horse battery staple"


@dataclass
class Orchestrator:
    """Our side: the recipient account (which also sends the redemptions), its secret, its
    ledger on a stream of its own, and a keystore the redeemer process unlocks."""

    account: LocalAccount
    secret: RecipientSecret
    ledger: Ledger
    keystore: Path
    password_file: Path
    redis_url: str

    @property
    def address(self) -> bytes:
        return bytes.fromhex(self.account.address[2:])


@pytest.fixture
def orchestrator(chain: DevChain, redis_server, tmp_path) -> Orchestrator:
    account = chain.new_account(10 * ETH)
    keystore = tmp_path / "keystore.json"
    keystore.write_text(json.dumps(Account.encrypt(account.key, PASSWORD)))
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    chain.set_active(account.address)  # only an active orchestrator claims from reserves
    ledger = Ledger(redis_server.client(), stream=f"{WINNING_STREAM}:{uuid.uuid4().hex}")
    return Orchestrator(
        account, RecipientSecret.generate(), ledger, keystore, password_file, redis_server.url
    )


@pytest.fixture
def gateway(chain: DevChain) -> LocalAccount:
    """A sender with a deposit and a reserve on the broker."""
    sender = chain.new_account(20 * ETH)
    chain.fund_sender(sender, deposit=5 * ETH, reserve=5 * ETH)
    return sender


_nonces = itertools.count(1)


def chain_view(chain: DevChain) -> ChainView:
    """The dev chain as the chain watcher would report it (its own block number is L1's)."""
    round_number = chain.current_round()
    return ChainView(
        l1_block=chain.w3.eth.block_number,
        current_round=round_number,
        creation_round=round_number,
        creation_round_block_hash=bytes(
            chain.rounds.functions.blockHashForRound(round_number).call()
        ),
    )


def pay(
    chain: DevChain, orch: Orchestrator, gateway: LocalAccount, tickets: int,
    win_prob: int = MAX_WIN_PROB // 2, face_value: int = ETH // 100,
) -> ValidPayment:  # fmt: skip
    """A gateway pays `tickets` tickets against fresh params; we validate them."""
    chain.start_round(chain.current_round() or 1)
    view = chain_view(chain)
    sender = bytes.fromhex(gateway.address[2:])
    params = ticket_params(
        orch.secret,
        orch.address,
        sender,
        face_value=face_value,
        win_prob=win_prob,
        expiration_block=view.l1_block + EXPIRATION_BLOCKS,
        price=PRICE,
        creation_round=view.creation_round,
        creation_round_block_hash=view.creation_round_block_hash,
    )
    nonces = [next(_nonces) for _ in range(tickets)]
    payment = sign_payment(params, gateway.key, sender, nonces)
    context = PaymentContext(orch.address, orch.secret, view, issued_prices=lambda _: {PRICE})
    valid = check_payment(wire.encode(payment), context)
    assert isinstance(valid, ValidPayment), valid
    return valid


def funds(chain: DevChain, orch: Orchestrator) -> tuple[int, int]:
    return chain.balance(orch.account.address), chain.fees_earned(orch.account.address)


def run_redeemer(
    chain: DevChain, orch: Orchestrator, *extra: str, failpoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "operator"), "KUBEPEER_RPC_URL": chain.url}
    if failpoint:
        env["KUBEPEER_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "kubepeer.cli", "payments", "--once", "--network", "dev",
         "--redis-url", orch.redis_url,
         "--controller", chain.controller.address, "--max-fee-per-gas", str(100 * 10**9),
         "--keystore", str(orch.keystore), "--password-file", str(orch.password_file),
         "--stream", orch.ledger.stream, *extra],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def winners(payment: ValidPayment) -> list[WinningTicket]:
    return [WinningTicket.from_accepted(t) for t in payment.tickets if t.winning]


def assert_redeemed_exactly_once(chain, orch, tickets, before: tuple[int, int], nonce_before):
    """Each ticket used once, its face value credited to our fee pool by the broker
    (deposits cover them here) and recorded as paid, our ETH spent only on gas, and no
    transaction sent that did not redeem something."""
    balance_before, fees_before = before
    book = TicketBook(orch.ledger.redis)
    records = [book.get(t.hash) for t in tickets]
    assert all(r is not None and r.state is State.REDEEMED for r in records), records
    assert all(chain.broker.functions.usedTickets(t.hash).call() for t in tickets)
    transactions = {r.tx_hash for r in records}
    assert chain.w3.eth.get_transaction_count(orch.account.address) - nonce_before == len(
        transactions
    )
    receipts = [chain.w3.eth.get_transaction_receipt(h) for h in transactions]
    gas = sum(r["gasUsed"] * r["effectiveGasPrice"] for r in receipts)
    faces = sum(t.ticket.face_value for t in tickets)
    assert [r.amount_paid for r in records] == [t.ticket.face_value for t in tickets]
    assert chain.fees_earned(orch.account.address) - fees_before == faces
    assert chain.balance(orch.account.address) - balance_before == -gas
    events = chain.broker.events.WinningTicketRedeemed().get_logs(from_block=0)
    redeemed_nonces = [
        e.args.senderNonce for e in events if e.args.recipient == orch.account.address
    ]
    assert sorted(redeemed_nonces) == sorted(t.ticket.sender_nonce for t in tickets)


def test_full_loop_gateway_to_ledger_to_chain(chain, orchestrator, gateway):
    payment = pay(chain, orchestrator, gateway, tickets=12)
    balance = orchestrator.ledger.credit(payment, MANIFEST)
    assert balance == payment.expected_value
    queued = winners(payment)
    assert queued, "with winProb 1/2, twelve tickets without a winner is a 1-in-4096 fluke"
    assert orchestrator.ledger.redis.xlen(orchestrator.ledger.stream) == len(queued)

    before = funds(chain, orchestrator)
    nonce = chain.w3.eth.get_transaction_count(orchestrator.account.address)
    early = run_redeemer(chain, orchestrator)
    assert early.returncode == 0, early.stderr
    assert chain.w3.eth.get_transaction_count(orchestrator.account.address) == nonce  # waits

    chain.mine(41)  # past the params' expiration block
    done = run_redeemer(chain, orchestrator)
    assert done.returncode == 0, done.stderr
    assert_redeemed_exactly_once(chain, orchestrator, queued, before, nonce)
    assert PASSWORD not in done.stderr
    assert orchestrator.account.key.hex() not in done.stderr


@pytest.mark.parametrize("failpoint", ["before-send", "after-send", "after-receipt"])
def test_redeemer_killed_at_any_point_loses_nothing_and_pays_once(
    chain, orchestrator, gateway, failpoint
):
    payment = pay(chain, orchestrator, gateway, tickets=3, win_prob=MAX_WIN_PROB)
    orchestrator.ledger.credit(payment, MANIFEST)
    queued = winners(payment)
    assert len(queued) == 3
    chain.mine(41)
    before = funds(chain, orchestrator)
    nonce = chain.w3.eth.get_transaction_count(orchestrator.account.address)

    crashed = run_redeemer(chain, orchestrator, failpoint=failpoint)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    restarted = run_redeemer(chain, orchestrator)
    assert restarted.returncode == 0, restarted.stderr
    assert_redeemed_exactly_once(chain, orchestrator, queued, before, nonce)
    pending = orchestrator.ledger.redis.xpending(orchestrator.ledger.stream, "redeemer")
    assert pending["pending"] == 0


def test_gas_price_over_the_ceiling_defers_without_losing_the_ticket(chain, orchestrator, gateway):
    payment = pay(chain, orchestrator, gateway, tickets=1, win_prob=MAX_WIN_PROB)
    orchestrator.ledger.credit(payment, MANIFEST)
    [ticket] = winners(payment)
    chain.mine(41)
    nonce = chain.w3.eth.get_transaction_count(orchestrator.account.address)

    deferred = run_redeemer(chain, orchestrator, "--max-fee-per-gas", "1")
    assert deferred.returncode == 0, deferred.stderr
    assert "over the ceiling" in deferred.stderr
    assert not chain.broker.functions.usedTickets(ticket.hash).call()
    assert TicketBook(orchestrator.ledger.redis).get(ticket.hash).state is State.PENDING
    assert chain.w3.eth.get_transaction_count(orchestrator.account.address) == nonce

    before = funds(chain, orchestrator)
    assert run_redeemer(chain, orchestrator).returncode == 0
    assert_redeemed_exactly_once(chain, orchestrator, [ticket], before, nonce)


def test_a_losing_ticket_is_never_sent(chain, orchestrator, gateway):
    payment = pay(chain, orchestrator, gateway, tickets=5, win_prob=0)
    orchestrator.ledger.credit(payment, MANIFEST)
    assert not winners(payment)
    assert orchestrator.ledger.redis.xlen(orchestrator.ledger.stream) == 0


def test_a_replayed_nonce_credits_nothing(chain, orchestrator, gateway):
    payment = pay(chain, orchestrator, gateway, tickets=2)
    first = orchestrator.ledger.credit(payment, MANIFEST)
    with pytest.raises(TicketRejected) as caught:
        orchestrator.ledger.credit(payment, MANIFEST)
    assert caught.value.reason == "replayed-nonce"
    assert orchestrator.ledger.balance(payment.sender, MANIFEST) == first


def test_concurrent_credits_sum_exactly_and_a_replay_wins_once(chain, orchestrator, gateway):
    payments = [pay(chain, orchestrator, gateway, tickets=2) for _ in range(24)]
    # Each payment twice, from many threads at once, as racing proxy replicas would.
    attempts = payments + payments

    def credit(p: ValidPayment) -> bool:
        ledger = Ledger(orchestrator.ledger.redis, stream=orchestrator.ledger.stream)
        try:
            ledger.credit(p, MANIFEST)
        except TicketRejected:
            return False
        return True

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(credit, attempts))
    assert sum(outcomes) == len(payments)
    expected = sum(p.expected_value for p in payments)
    assert orchestrator.ledger.balance(payments[0].sender, MANIFEST) == expected


def test_debit_charges_fees_against_the_credit(chain, orchestrator, gateway):
    payment = pay(chain, orchestrator, gateway, tickets=1)
    credit = orchestrator.ledger.credit(payment, MANIFEST)
    assert orchestrator.ledger.debit(payment.sender, MANIFEST, 1000) == credit - 1000


def test_an_acknowledged_credit_survives_redis_being_killed(chain, orchestrator, gateway, tmp_path):
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
               "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    client = redis_lib.Redis(port=port)
    wait_for(lambda: _pings(client), timeout=20, what="the AOF redis-server")
    ledger = Ledger(client, stream=f"{WINNING_STREAM}:durable")
    payment = pay(chain, orchestrator, gateway, tickets=4, win_prob=MAX_WIN_PROB)
    balance = ledger.credit(payment, MANIFEST)

    server.send_signal(signal.SIGKILL)  # no shutdown, no final save
    server.wait()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _pings(client), timeout=20, what="redis-server to come back")
        assert int(client.get(balance_key(payment.sender, MANIFEST))) == balance
        assert client.xlen(f"{WINNING_STREAM}:durable") == 4
        with pytest.raises(TicketRejected):
            ledger.credit(payment, MANIFEST)  # the nonces survived too
    finally:
        server.terminate()
        server.wait()


def _pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.ConnectionError:
        return False
