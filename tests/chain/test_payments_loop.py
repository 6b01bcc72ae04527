"""Payments end to end on real servers: Redis ledger, Hardhat dev chain, redeemer process."""

from __future__ import annotations

import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis as redis_lib

from kubepeer.payments.ledger import WINNING_STREAM, Ledger, balance_key
from kubepeer.payments.queue import State, TicketBook
from kubepeer.payments.ticket import MAX_WIN_PROB
from kubepeer.payments.validator import TicketRejected, ValidPayment
from tests import paying
from tests.conftest import free_port
from tests.paying import (
    MANIFEST,
    assert_redeemed_exactly_once,
    funds,
    pay,
    run_redeemer,
    winners,
)
from tests.support import wait_for

pytestmark = [pytest.mark.chain, pytest.mark.redis]
pytest_plugins = ["tests.paying"]


def test_full_loop_gateway_to_ledger_to_chain(chain, orchestrator, gateway):
    payment = pay(chain, orchestrator, gateway, tickets=12)
    balance = orchestrator.ledger.credit(payment, MANIFEST)
    assert balance == int(payment.expected_value)  # whole wei, the rest kept apart
    assert orchestrator.ledger.exact_balance(payment.sender, MANIFEST) == payment.expected_value
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
    assert paying.PASSWORD not in done.stderr
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
    assert orchestrator.ledger.exact_balance(payments[0].sender, MANIFEST) == expected
    assert orchestrator.ledger.balance(payments[0].sender, MANIFEST) == int(expected)


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
