"""The redeemer against the strict TicketBroker: what it waits for, what it gives up on,
what it does with stuck transactions, lost Leases, poison entries and short senders. Every
outcome is asserted against the contract (usedTickets, the fee pool, its events)."""

from __future__ import annotations

import subprocess
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubepeer.livepeer import wire
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.ledger import Ledger
from kubepeer.payments.queue import State, TicketBook
from kubepeer.payments.recipient import EXPIRATION_BLOCKS, ticket_params
from kubepeer.payments.redeemer import LeaseLost
from kubepeer.payments.reward import RewardCaller
from kubepeer.payments.ticket import MAX_WIN_PROB
from kubepeer.payments.validator import PaymentContext, TicketRejected, ValidPayment, check_payment
from kubepeer_dev.devchain import ETH
from tests.paying import (
    MANIFEST,
    assert_redeemed_exactly_once,
    chain_view,
    funds,
    pay,
    payments_process,
    queue_winners,
    redeemer,
    relay_rpc,
    run_redeemer,
    winners,
)
from tests.support import wait_for

pytestmark = [pytest.mark.chain, pytest.mark.redis]
pytest_plugins = ["tests.paying"]


def states(orch, tickets) -> list[State | None]:
    book = TicketBook(orch.ledger.redis)
    return [record.state if (record := book.get(t.hash)) else None for t in tickets]


def sent(chain, orch) -> int:
    return chain.w3.eth.get_transaction_count(orch.account.address)


def test_an_uninitialized_round_defers_and_the_ticket_is_redeemed_once_it_is(
    chain, orchestrator, gateway
):
    tickets = queue_winners(chain, orchestrator, gateway, 2)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)
    chain.begin_round(chain.current_round() + 1)  # nobody has called initializeRound yet
    try:
        assert redeemer(chain, orchestrator).run_once() == 0
        assert states(orchestrator, tickets) == [State.PENDING] * 2
        assert sent(chain, orchestrator) == nonce
    finally:
        chain.initialize_round()
    assert redeemer(chain, orchestrator).run_once() == 2
    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)


def test_a_paused_system_defers_and_the_ticket_is_redeemed_once_unpaused(
    chain, orchestrator, gateway
):
    tickets = queue_winners(chain, orchestrator, gateway, 1)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)
    chain.set_paused(True)
    try:
        done = run_redeemer(chain, orchestrator)
        assert done.returncode == 0, done.stderr
        assert "system is paused" in done.stderr
        assert states(orchestrator, tickets) == [State.PENDING]
        assert sent(chain, orchestrator) == nonce
    finally:
        chain.set_paused(False)
    assert run_redeemer(chain, orchestrator).returncode == 0
    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)


def test_an_expired_ticket_fails_with_the_contracts_reason(chain, orchestrator, gateway):
    [ticket] = queue_winners(chain, orchestrator, gateway, 1)
    nonce = sent(chain, orchestrator)
    chain.start_round(chain.current_round() + 2)  # creationRound + ticketValidityPeriod
    assert redeemer(chain, orchestrator).run_once() == 1
    record = TicketBook(orchestrator.ledger.redis).get(ticket.hash)
    assert record.state is State.FAILED
    assert "ticket is expired" in record.reason
    assert sent(chain, orchestrator) == nonce
    assert not chain.broker.functions.usedTickets(ticket.hash).call()


def test_a_batch_of_eight_redeems_each_once_in_one_transaction(chain, orchestrator, gateway):
    tickets = queue_winners(chain, orchestrator, gateway, 8)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)
    assert redeemer(chain, orchestrator, batch_size=8).run_once() == 8
    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)
    book = TicketBook(orchestrator.ledger.redis)
    assert len({book.get(t.hash).tx_hash for t in tickets}) == 1
    assert sent(chain, orchestrator) - nonce == 1


def test_a_face_value_beyond_the_senders_funds_records_what_was_paid(
    chain, orchestrator, gateway_factory
):
    """Deposit first, then only our share of the reserve: the broker pays less than the face
    value, and the amount recorded is the contract's, not the face value."""
    poor = gateway_factory(deposit=ETH // 1000, reserve=ETH // 100)
    [ticket] = queue_winners(chain, orchestrator, poor, 1, face_value=ETH // 10)
    sender = poor.address
    deposit = chain.broker.functions.getSenderInfo(sender).call()[0][0]
    share = chain.broker.functions.claimableReserve(sender, orchestrator.account.address).call()
    assert deposit + share < ticket.ticket.face_value
    fees_before = chain.fees_earned(orchestrator.account.address)

    assert redeemer(chain, orchestrator).run_once() == 1
    record = TicketBook(orchestrator.ledger.redis).get(ticket.hash)
    assert record.state is State.REDEEMED
    assert record.amount_paid == deposit + share
    assert chain.fees_earned(orchestrator.account.address) - fees_before == record.amount_paid
    [transfer] = chain.broker.events.WinningTicketTransfer().get_logs(
        from_block=chain.w3.eth.block_number, argument_filters={"sender": sender}
    )
    assert transfer.args.amount == record.amount_paid


def test_a_poison_entry_is_parked_and_the_tickets_after_it_are_redeemed(
    chain, orchestrator, gateway
):
    stream = orchestrator.ledger.stream
    poison = orchestrator.ledger.redis.xadd(stream, {"ticket": "{not json"})
    tickets = queue_winners(chain, orchestrator, gateway, 2)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)
    assert redeemer(chain, orchestrator).run_once() == 2
    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)
    [(_, parked)] = orchestrator.ledger.redis.xrange(f"{stream}:parked")
    assert parked[b"entry"] == poison
    assert b"malformed entry" in parked[b"error"]
    assert orchestrator.ledger.redis.xpending(stream, "redeemer")["pending"] == 0


def test_an_entry_that_keeps_raising_is_parked_after_its_attempts(chain, orchestrator, gateway):
    [good] = queue_winners(chain, orchestrator, gateway, 1)
    # Well-formed JSON, but a recipient no transaction can carry: every attempt raises.
    broken = good.to_json().replace(good.ticket.recipient.hex(), "ab" * 7)
    stream = orchestrator.ledger.stream
    orchestrator.ledger.redis.xadd(stream, {"ticket": broken})
    worker = redeemer(chain, orchestrator, max_attempts=2)
    worker.run_once()
    assert orchestrator.ledger.redis.xlen(f"{stream}:parked") == 0
    worker.run_once()
    [(_, parked)] = orchestrator.ledger.redis.xrange(f"{stream}:parked")
    assert parked[b"ticket"].decode() == broken
    assert states(orchestrator, [good]) == [State.REDEEMED]  # the good entry went through


def test_losing_the_lease_mid_batch_stops_sending_and_a_standby_finishes(
    chain, orchestrator, gateway
):
    tickets = queue_winners(chain, orchestrator, gateway, 6)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)

    def lease_held() -> bool:  # the Lease is lost once the first transaction is mined
        return sent(chain, orchestrator) == nonce

    first = redeemer(chain, orchestrator, may_send=lease_held, batch_size=2)
    with pytest.raises(LeaseLost):
        first.run_once()
    assert sent(chain, orchestrator) - nonce == 1
    assert states(orchestrator, tickets).count(State.REDEEMED) == 2

    standby = redeemer(chain, orchestrator, consumer="redeemer-1", batch_size=2)
    standby.run_once()
    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)
    assert (
        orchestrator.ledger.redis.xpending(orchestrator.ledger.stream, "redeemer")["pending"] == 0
    )


def test_a_stuck_transaction_is_replaced_with_higher_fees_and_mined_once(
    chain, orchestrator, gateway
):
    tickets = queue_winners(chain, orchestrator, gateway, 1)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)
    rpc = chain.w3.provider.make_request
    low = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    high = max(10 * low, 10**9)  # far above the first offer (2x the base fee it saw)
    done = threading.Event()

    def miner() -> None:
        """Once the first transaction is in the pool, blocks come with a base fee of `high`:
        the first offer can never be included, only a replacement can."""
        while not done.is_set() and sent(chain, orchestrator) == nonce and not _in_pool():
            time.sleep(0.05)
        while not done.is_set():
            rpc("hardhat_setNextBlockBaseFeePerGas", [hex(high)])
            rpc("evm_mine", [])
            time.sleep(0.3)

    def _in_pool() -> bool:
        pending = chain.w3.eth.get_transaction_count(orchestrator.account.address, "pending")
        return pending > nonce

    rpc("evm_setAutomine", [False])
    thread = threading.Thread(target=miner, daemon=True)
    try:
        thread.start()
        worker = redeemer(chain, orchestrator, stuck_after=1.5)
        assert worker.run_once() == 1
    finally:
        done.set()
        thread.join()
        rpc("evm_setAutomine", [True])

    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)
    record = TicketBook(orchestrator.ledger.redis).get(tickets[0].hash)
    mined = chain.w3.eth.get_transaction(record.tx_hash)
    assert mined["maxFeePerGas"] >= high  # the replacement, not the first offer
    assert mined["nonce"] == nonce
    assert chain.w3.eth.get_transaction_count(orchestrator.account.address, "pending") == nonce + 1


def test_reward_is_called_once_per_round_never_twice_never_when_inactive(
    chain, orchestrator, redis_server
):
    me = orchestrator.account.address
    caller = RewardCaller(
        redis_server.client(), chain.w3, chain.bonding.address, orchestrator.account,
        max_fee_per_gas=100 * 10**9,
    )  # fmt: skip
    calls = chain.bonding.functions.rewardCalls
    chain.start_round(chain.current_round() + 1)

    chain.set_active(me, False)
    assert not caller.maybe_reward(chain_view(chain, me))
    chain.set_active(me, True)
    assert caller.maybe_reward(chain_view(chain, me))
    assert not caller.maybe_reward(chain_view(chain, me))
    assert calls(me).call() == 1

    chain.begin_round(chain.current_round() + 1)
    assert not caller.maybe_reward(chain_view(chain, me))  # not initialized: wait
    chain.initialize_round()
    assert caller.maybe_reward(chain_view(chain, me))
    assert not caller.maybe_reward(chain_view(chain, me))
    assert calls(me).call() == 2
    assert chain.bonding.functions.lastRewardRound(me).call() == chain.current_round()


def test_the_rpc_url_never_reaches_the_log(chain, orchestrator):
    secret_url = "http://127.0.0.1:9/v2/sekrit-api-key?token=also-sekrit"
    done = run_redeemer(chain, orchestrator, rpc_url=secret_url)
    assert done.returncode != 0
    assert "sekrit" not in done.stderr
    assert "[rpc-url]" in done.stderr


def test_a_payment_without_tickets_spends_the_existing_balance(chain, orchestrator, gateway):
    ledger: Ledger = orchestrator.ledger
    ticket_ev = 10**6
    first = pay(chain, orchestrator, gateway, tickets=1)
    balance = ledger.admit(first, MANIFEST, ticket_ev)
    ticketless = ValidPayment(sender=first.sender, price=Fraction(1000))
    assert ledger.admit(ticketless, MANIFEST, ticket_ev) == balance  # credits nothing
    ledger.debit(first.sender, MANIFEST, balance)
    with pytest.raises(TicketRejected) as refused:
        ledger.admit(ticketless, MANIFEST, ticket_ev)
    assert str(refused.value) == "Insufficient balance"
    assert ledger.balance(first.sender, MANIFEST) == 0


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.one_of(st.integers(0, 2**64), st.integers(0, 2**256 - 1)),
    face_value=st.integers(1, ETH // 100),
    nonce=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_every_ticket_the_validator_accepts_the_contract_would_pay(
    chain, orchestrator, gateway, seed, face_value, nonce
):
    """Params with any seed (leading zero bytes included, sent as a Go gateway's big.Int),
    signed by the gateway, accepted by check_payment: the broker's own redeem accepts them."""
    chain.start_round(chain.current_round() or 1)
    view = chain_view(chain)
    sender = bytes.fromhex(gateway.address[2:])
    params = ticket_params(
        orchestrator.secret, orchestrator.address, sender, face_value=face_value,
        win_prob=MAX_WIN_PROB, expiration_block=view.l1_block + EXPIRATION_BLOCKS,
        price=Fraction(1000), creation_round=view.creation_round,
        creation_round_block_hash=view.creation_round_block_hash, seed=seed,
    )  # fmt: skip
    header = wire.encode(sign_payment(params, gateway.key, sender, [nonce]))
    context = PaymentContext(
        orchestrator.address, orchestrator.secret, view, issued_prices=lambda _: {Fraction(1000)}
    )
    valid = check_payment(header, context)
    assert isinstance(valid, ValidPayment), valid
    [accepted] = valid.tickets
    call = chain.broker.functions.redeemWinningTicket(
        accepted.ticket.abi_tuple(), accepted.sig, accepted.recipient_rand
    )
    assert call.estimate_gas({"from": orchestrator.account.address}) > 0  # no revert


def test_rpc_errors_never_stop_the_payments_process(chain, orchestrator, gateway, tmp_path):
    """The RPC node answering errors for a while (fault injection in front of the real node):
    the process backs off and carries on, and the ticket is redeemed once it answers again."""
    payment = pay(chain, orchestrator, gateway, tickets=1, win_prob=MAX_WIN_PROB)
    orchestrator.ledger.credit(payment, MANIFEST)
    tickets = winners(payment)
    before, nonce = funds(chain, orchestrator), sent(chain, orchestrator)
    failing = threading.Event()

    def flaky(request: dict, response: dict) -> dict:
        if not failing.is_set():
            return response
        error = {"code": -32000, "message": "upstream request timeout"}
        return {"jsonrpc": "2.0", "id": request.get("id"), "error": error}

    log = tmp_path / "payments.log"
    with relay_rpc(chain.url, flaky) as url:
        command, env = payments_process(chain, orchestrator, rpc_url=url)
        process = subprocess.Popen(
            command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: "redeeming as" in log.read_text(), timeout=60, what="startup")
            failing.set()
            chain.mine(EXPIRATION_BLOCKS + 1)  # the ticket is ready, the RPC is failing
            wait_for(lambda: log.read_text().count("payments pass failed") >= 2, timeout=60,
                     what="failed passes")  # fmt: skip
            assert process.poll() is None, log.read_text()
            failing.clear()
            try:
                wait_for(lambda: states(orchestrator, tickets) == [State.REDEEMED], timeout=180,
                         what="the ticket to be redeemed")  # fmt: skip
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text()[-4000:]}") from None
            assert process.poll() is None, log.read_text()
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert_redeemed_exactly_once(chain, orchestrator, tickets, before, nonce)


def test_the_payments_process_calls_reward_once_a_round_when_asked(chain, orchestrator):
    me = orchestrator.account.address
    chain.start_round(chain.current_round() + 1)
    calls = chain.bonding.functions.rewardCalls(me).call
    assert run_redeemer(chain, orchestrator).returncode == 0  # not asked: no call
    assert calls() == 0
    for _ in range(2):
        done = run_redeemer(chain, orchestrator, "--reward")
        assert done.returncode == 0, done.stderr
        assert calls() == 1
    assert chain.bonding.functions.lastRewardRound(me).call() == chain.current_round()


def test_a_ticket_the_batch_skips_is_reported_apart_from_the_ones_it_paid(
    chain, orchestrator, gateway_factory
):
    """The deposit covers one ticket and there is no reserve: in one batch the broker pays
    the first and skips the second ('sender deposit and reserve are zero'), which the events
    show; the skipped one then fails with the contract's reason, without another send."""
    face = ETH // 100
    short = gateway_factory(deposit=face, reserve=0)
    tickets = queue_winners(chain, orchestrator, short, 2, face_value=face)
    nonce = sent(chain, orchestrator)
    worker = redeemer(chain, orchestrator, batch_size=8)
    assert worker.run_once() == 1
    book = TicketBook(orchestrator.ledger.redis)
    records = [book.get(t.hash) for t in tickets]
    paid, skipped = sorted(records, key=lambda r: r.state is not State.REDEEMED)
    assert (paid.state, paid.amount_paid) == (State.REDEEMED, face)
    assert skipped.state is State.PENDING
    assert paid.tx_hash in skipped.reason  # "not redeemed by <the batch>"
    assert sent(chain, orchestrator) - nonce == 1

    assert worker.run_once() == 1
    assert sent(chain, orchestrator) - nonce == 1
    failed = [book.get(t.hash) for t in tickets if book.get(t.hash).state is State.FAILED]
    assert len(failed) == 1
    assert "sender deposit and reserve are zero" in failed[0].reason
