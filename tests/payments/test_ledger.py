"""The ledger's balance is exact, as go-livepeer's big.Rat balance is: real Redis.

go-livepeer credits each ticket `ticketEV = faceValue x winProb / maxWinProb` as a big.Rat
with maxWinProb = 2^256 - 1 (pm/ticket.go, pm/recipient.go), and compares the balance with
the ticket EV without rounding. The oracle here is that formula, written out with the
literal 2^256 - 1, never our own constant.
"""

from __future__ import annotations

import itertools
import uuid
from fractions import Fraction

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubepeer.livepeer import wire
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.ledger import WINNING_STREAM, Ledger
from kubepeer.payments.recipient import RecipientSecret, issue_ticket_params, ticket_params
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.ticket import Ticket
from kubepeer.payments.validator import (
    AcceptedTicket,
    PaymentContext,
    TicketRejected,
    ValidPayment,
    check_payment,
)

pytestmark = pytest.mark.redis

GO_MAX_WIN_PROB = 2**256 - 1  # go-livepeer's maxWinProb
ORCH, GATEWAY = Account.create(), Account.create()
RECIPIENT = bytes.fromhex(ORCH.address[2:])
SENDER = bytes.fromhex(GATEWAY.address[2:])
SECRET = RecipientSecret(b"\x05" * 32)
PRICE = Fraction(1000)
ROUND_HASH = b"\x22" * 32
CHAIN = ChainView(
    l1_block=1000, current_round=3, creation_round=3, creation_round_block_hash=ROUND_HASH,
    gas_price=10**8,
)  # fmt: skip
CONTEXT = PaymentContext(RECIPIENT, SECRET, CHAIN, issued_prices=lambda _: {PRICE})
_nonces = itertools.count(1)


def go_ticket_ev(face_value: int, win_prob: int) -> Fraction:
    return Fraction(face_value * win_prob, GO_MAX_WIN_PROB)


@pytest.fixture
def ledger(redis_server) -> Ledger:
    return Ledger(redis_server.client(), stream=f"{WINNING_STREAM}:{uuid.uuid4().hex}")


@pytest.fixture
def manifest() -> str:
    return f"27_{uuid.uuid4().hex}"


def signed(face_value: int, win_prob: int, tickets: int = 1) -> ValidPayment:
    """What the validator accepts from a gateway paying against these params."""
    params = ticket_params(
        SECRET, RECIPIENT, SENDER, face_value=face_value, win_prob=win_prob,
        expiration_block=CHAIN.l1_block + 40, price=PRICE, creation_round=CHAIN.creation_round,
        creation_round_block_hash=ROUND_HASH,
    )  # fmt: skip
    nonces = [next(_nonces) for _ in range(tickets)]
    valid = check_payment(wire.encode(sign_payment(params, GATEWAY.key, SENDER, nonces)), CONTEXT)
    assert isinstance(valid, ValidPayment), valid
    return valid


def unsigned(face_value: int, win_prob: int, tickets: int) -> ValidPayment:
    """The same shape without signing: the ledger credits what it is handed, and hypothesis
    needs many of them."""
    rand_hash = uuid.uuid4().bytes * 2  # its own nonce set
    accepted = [
        AcceptedTicket(
            ticket=Ticket(RECIPIENT, SENDER, face_value, win_prob, nonce, rand_hash),
            sig=b"",
            recipient_rand=0,
            winning=False,
            expiration_block=0,
        )
        for nonce in range(tickets)
    ]
    return ValidPayment(SENDER, PRICE, recipient_rand_hash=rand_hash, tickets=accepted)


def test_n_one_ticket_payments_credit_exactly_n_ticket_evs(ledger, manifest):
    # EV 3 x (maxWinProb // 2) / maxWinProb = 1.4999...: rounding each credit down, ten
    # payments would credit 10 wei; go-livepeer's balance holds 14.999... wei.
    face, prob = 3, GO_MAX_WIN_PROB // 2
    for n in range(1, 11):
        whole = ledger.credit(signed(face, prob), manifest)
        assert ledger.exact_balance(SENDER, manifest) == n * go_ticket_ev(face, prob)
        assert whole == ledger.balance(SENDER, manifest) == (n * face * prob) // GO_MAX_WIN_PROB
    assert ledger.balance(SENDER, manifest) == 14


def test_fees_come_off_the_exact_balance(ledger, manifest):
    face, prob = 7, GO_MAX_WIN_PROB // 3
    ledger.credit(signed(face, prob, tickets=4), manifest)
    assert ledger.debit(SENDER, manifest, 5) == 4
    assert ledger.exact_balance(SENDER, manifest) == 4 * go_ticket_ev(face, prob) - 5


def test_fractions_that_add_up_to_exactly_one_wei_carry(ledger, manifest):
    a = GO_MAX_WIN_PROB // 7
    ledger.credit(unsigned(1, a, 1), manifest)
    assert ledger.balance(SENDER, manifest) == 0
    ledger.credit(unsigned(1, GO_MAX_WIN_PROB - a, 1), manifest)  # the rest of one wei
    assert ledger.exact_balance(SENDER, manifest) == 1
    assert ledger.balance(SENDER, manifest) == 1
    ledger.credit(unsigned(1, GO_MAX_WIN_PROB - 1, 2), manifest)  # 2 - 2/maxWinProb
    assert ledger.exact_balance(SENDER, manifest) == 3 - Fraction(2, GO_MAX_WIN_PROB)
    assert ledger.balance(SENDER, manifest) == 2


def test_one_honest_ticket_covers_the_ticket_ev_it_was_issued_for(ledger, manifest):
    ev = 8_000_000_000
    params = issue_ticket_params(SECRET, RECIPIENT, SENDER, CHAIN, price=PRICE, ev=ev)
    payment = sign_payment(params, GATEWAY.key, SENDER, [next(_nonces)])
    valid = check_payment(wire.encode(payment), CONTEXT)
    assert isinstance(valid, ValidPayment), valid
    assert ledger.admit(valid, manifest, ev) == ev  # no wei short of it


def test_a_balance_a_fraction_short_of_the_ticket_ev_is_insufficient(ledger, manifest):
    ev = 2
    with pytest.raises(TicketRejected, match="Insufficient balance"):
        ledger.admit(unsigned(1, GO_MAX_WIN_PROB - 1, 2), manifest, ev)  # 2 - 2/maxWinProb
    assert ledger.exact_balance(SENDER, manifest) == 2 - Fraction(2, GO_MAX_WIN_PROB)


@settings(
    max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.integers(1, 2**40),
                st.one_of(
                    st.integers(0, GO_MAX_WIN_PROB),
                    st.sampled_from([1, GO_MAX_WIN_PROB - 1, GO_MAX_WIN_PROB, 2**255]),
                ),
                st.integers(1, 8),
            ),
            st.integers(0, 2**30),  # a fee
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_credits_and_debits_keep_the_balance_exact(redis_server, steps):
    ledger = Ledger(redis_server.client(), stream=f"{WINNING_STREAM}:{uuid.uuid4().hex}")
    manifest = f"27_{uuid.uuid4().hex}"
    expected = Fraction(0)
    for step in steps:
        if isinstance(step, tuple):
            face, prob, tickets = step
            ledger.credit(unsigned(face, prob, tickets), manifest)
            expected += tickets * go_ticket_ev(face, prob)
        else:
            ledger.debit(SENDER, manifest, step)
            expected -= step
        assert ledger.exact_balance(SENDER, manifest) == expected
        assert ledger.balance(SENDER, manifest) == expected.numerator // expected.denominator
