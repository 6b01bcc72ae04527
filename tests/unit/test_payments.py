"""Ticket maths and payment validation: pure, no chain, no Redis."""

from __future__ import annotations

import base64
import itertools
from dataclasses import replace
from fractions import Fraction
from types import SimpleNamespace

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubepeer.livepeer import net_pb2, wire
from kubepeer.payments.gateway import sign_payment, ticketless_payment
from kubepeer.payments.recipient import (
    DEFAULT_TICKET_EV,
    EXPIRATION_BLOCKS,
    InsufficientSenderReserve,
    RecipientSecret,
    face_value_for,
    issue_ticket_params,
    price_info,
    ticket_params,
    ticket_params_message,
    win_prob_for,
)
from kubepeer.payments.redeemer import Fees, bumped, fees_for, redemptions_in, revert_is_retryable
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo, max_float
from kubepeer.payments.ticket import (
    MAX_WIN_PROB,
    SECP256K1_N,
    Ticket,
    minimal_bytes,
    recipient_rand_hash,
)
from kubepeer.payments.validator import (
    PaymentContext,
    TicketRejected,
    ValidPayment,
    check_payment,
)

ORCH = Account.create()
GATEWAY = Account.create()
RECIPIENT = bytes.fromhex(ORCH.address[2:])
SENDER = bytes.fromhex(GATEWAY.address[2:])
SECRET = RecipientSecret(b"\x07" * 32)
PRICE = Fraction(1200, 1)
ROUND_HASH = b"\x11" * 32
CHAIN = ChainView(
    l1_block=1000,
    current_round=7,
    creation_round=7,
    creation_round_block_hash=ROUND_HASH,
    gas_price=10**8,
)


def params(chain=CHAIN, **overrides):
    kwargs = dict(secret=SECRET, recipient=RECIPIENT, sender=SENDER, chain=chain,
                  price=PRICE)  # fmt: skip
    return issue_ticket_params(**{**kwargs, **overrides})


def payment(nonces=(1, 2, 3), key=GATEWAY.key, p=None, price=None) -> net_pb2.Payment:
    return sign_payment(p or params(), key, SENDER, nonces, price)


def context(chain=CHAIN, info=None, offered=(PRICE,)) -> PaymentContext:
    return PaymentContext(
        recipient=RECIPIENT,
        secret=SECRET,
        chain=chain,
        issued_prices=lambda sender: set(offered) if sender == SENDER else set(),
        sender_info=lambda _: info,
    )


def check(pay: net_pb2.Payment, **kw) -> ValidPayment | TicketRejected:
    return check_payment(wire.encode(pay), context(**kw))


def rejected(pay: net_pb2.Payment, **kw) -> TicketRejected:
    outcome = check(pay, **kw)
    assert isinstance(outcome, TicketRejected), outcome
    return outcome


def accepted(pay: net_pb2.Payment, **kw) -> ValidPayment:
    outcome = check(pay, **kw)
    assert isinstance(outcome, ValidPayment), outcome
    return outcome


def test_a_good_payment_is_accepted_with_its_expected_value():
    valid = accepted(payment())
    assert valid.sender == SENDER
    assert valid.price == PRICE
    assert valid.nonces == [1, 2, 3]
    one = valid.tickets[0].ticket
    # go-livepeer's ticketEV: a big.Rat, faceValue x winProb / (2^256 - 1).
    assert one.expected_value == Fraction(one.face_value * one.win_prob, 2**256 - 1)
    # The issued params never fall short of the default EV, and overshoot it by far less
    # than a wei.
    assert DEFAULT_TICKET_EV <= one.expected_value < DEFAULT_TICKET_EV + 1
    assert valid.expected_value == 3 * one.expected_value
    assert len(one.aux_data) == 64  # what the TicketBroker insists on


def test_forged_signature_is_rejected():
    outcome = rejected(payment(key=Account.create().key))
    assert outcome.reason == "bad-signature"
    assert "not the sender" in str(outcome)


def _with_sig(pay: net_pb2.Payment, sig: bytes) -> net_pb2.Payment:
    pay.ticket_sender_params[0].sig = sig
    return pay


def test_the_high_s_twin_of_a_valid_signature_is_rejected():
    pay = payment(nonces=(1,))
    sig = pay.ticket_sender_params[0].sig
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    # (r, n - s) with the other v recovers the same address: valid ECDSA, unredeemable.
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    ticket = accepted(pay).tickets[0].ticket
    signed = encode_defunct(primitive=ticket.hash)
    assert Account.recover_message(signed, signature=twin) == GATEWAY.address
    outcome = rejected(_with_sig(pay, twin))
    assert outcome.reason == "signature-high-s"
    assert "high-s" in str(outcome)


@pytest.mark.parametrize("v", [0, 1, 29])
def test_a_signature_with_v_outside_27_28_is_rejected(v):
    pay = payment(nonces=(1,))
    sig = pay.ticket_sender_params[0].sig
    outcome = rejected(_with_sig(pay, sig[:64] + bytes([v])))
    assert outcome.reason == "signature-v"
    assert f"v is {v}" in str(outcome)


def test_malformed_signature_is_rejected():
    outcome = rejected(_with_sig(payment(), b"\x01" * 10))
    assert outcome.reason == "signature-length"
    assert "65 bytes" in str(outcome)


def test_ticket_for_another_recipient_is_rejected():
    assert rejected(payment(p=params(recipient=b"\x99" * 20))).reason == "wrong-recipient"


@pytest.mark.parametrize("field", ["face_value", "win_prob", "seed", "expiration_block"])
def test_altered_params_break_the_recipient_rand(field):
    pay = payment()
    original = getattr(pay.ticket_params, field)
    setattr(pay.ticket_params, field, minimal_bytes(int.from_bytes(original, "big") - 1))
    assert rejected(pay).reason == "wrong-recipient-rand"


def test_params_from_another_secret_are_rejected():
    theirs = params(secret=RecipientSecret(b"\x08" * 32))
    outcome = rejected(payment(p=theirs))
    assert outcome.reason == "wrong-recipient-rand"
    assert "invalid recipientRand for ticket recipientRandHash" in str(outcome)


def test_a_lie_about_the_price_is_caught():
    assert rejected(payment(price=(1, 1))).reason == "unknown-price"
    # Even a price we did offer this sender, claimed on params issued at another one:
    # recipientRand binds the params to their own price.
    lie = rejected(payment(price=(1, 1)), offered=(PRICE, Fraction(1)))
    assert lie.reason == "wrong-recipient-rand"


def test_a_price_is_compared_in_lowest_terms():
    issued = params(price=(2400, 2))
    assert issued.price == Fraction(1200, 1)
    assert accepted(payment(p=issued, price=(3600, 3))).price == PRICE


# The integer fields in the order the old recipientRand joined their minimal bytes.
SHIFTABLE = ["seed", "face_value", "win_prob", "expiration_block", "price_num", "price_den",
             "creation_round"]  # fmt: skip


def _shifted(base, left: str, right: str):
    """Params whose minimal-byte concatenation of `left` and `right` is unchanged, with one
    byte moved across the boundary: the same bytes, split differently."""
    values = {
        "seed": base.seed, "face_value": base.face_value, "win_prob": base.win_prob,
        "expiration_block": base.expiration_block, "price_num": base.price.numerator,
        "price_den": base.price.denominator, "creation_round": base.creation_round,
    }  # fmt: skip
    a, b = minimal_bytes(values[left]), minimal_bytes(values[right])
    if len(a) >= 2:
        a, b = a[:-1], a[-1:] + b
    else:
        a, b = a + b[:1], b[1:]
    values[left], values[right] = int.from_bytes(a, "big"), int.from_bytes(b, "big")
    return values


@pytest.mark.parametrize(("left", "right"), list(itertools.pairwise(SHIFTABLE)))
def test_shifting_bytes_between_adjacent_fields_is_rejected(left, right):
    base = params(price=Fraction(1200, 1))
    v = _shifted(base, left, right)
    v["price_den"] = v["price_den"] or 1  # a zero denominator is refused before anything
    moved = replace(
        base, seed=v["seed"], face_value=v["face_value"], win_prob=v["win_prob"],
        expiration_block=v["expiration_block"], creation_round=v["creation_round"],
        price=Fraction(v["price_num"], v["price_den"]),
    )  # fmt: skip
    pay = sign_payment(moved, GATEWAY.key, SENDER, [1], (v["price_num"], v["price_den"]))
    chain = replace(CHAIN, current_round=max(CHAIN.current_round, moved.creation_round))
    # The moved price offered too: only recipientRand's binding can refuse it.
    assert isinstance(check(pay, chain=chain, offered=(PRICE, moved.price)), TicketRejected)


def test_the_old_ambiguous_shift_of_expiration_and_price_is_rejected():
    """The concrete attack: price 1200/1 passing as 4/45057 (expiration block 0x41 | 0x04 |
    0xb0 0x01 re-split)."""
    chain = replace(CHAIN, l1_block=0x41 - EXPIRATION_BLOCKS)
    base = params(chain=chain, price=Fraction(1200, 1))
    assert minimal_bytes(base.expiration_block) + minimal_bytes(1200) + minimal_bytes(1) == (
        minimal_bytes(base.expiration_block) + minimal_bytes(4) + minimal_bytes(45057)
    )
    pay = sign_payment(base, GATEWAY.key, SENDER, [1], (4, 45057))
    offered = (Fraction(1200), Fraction(4, 45057))  # even were both offered to this sender
    assert rejected(pay, chain=chain, offered=offered).reason == "wrong-recipient-rand"


def test_seeds_and_values_with_leading_zeros_round_trip_like_a_go_gateway():
    """go-livepeer sends big.Int.Bytes(): a seed below 2^248 arrives shorter than 32 bytes."""
    for seed in (1, 2**200 + 5, 2**248 - 1):
        p = ticket_params(
            SECRET, RECIPIENT, SENDER, face_value=2**64, win_prob=2**250,
            expiration_block=CHAIN.l1_block + 10, price=PRICE, creation_round=7,
            creation_round_block_hash=ROUND_HASH, seed=seed,
        )  # fmt: skip
        pay = payment(p=p)
        assert len(pay.ticket_params.seed) < 32
        assert accepted(pay).nonces == [1, 2, 3]
        # And a gateway that pads instead of trimming is the same integers.
        for name in ("seed", "face_value", "win_prob", "expiration_block"):
            setattr(pay.ticket_params, name, b"\x00" * 3 + getattr(pay.ticket_params, name))
        assert accepted(pay).nonces == [1, 2, 3]


def test_expired_params_are_rejected_with_the_text_gateways_refresh_on():
    p = params()
    outcome = rejected(payment(p=p), chain=replace(CHAIN, l1_block=p.expiration_block))
    assert outcome.reason == "expired"
    assert str(outcome).startswith("TicketParams expired")


def test_params_of_a_round_too_old_to_redeem_are_rejected():
    later = replace(CHAIN, current_round=CHAIN.current_round + 2, creation_round=9)
    assert rejected(payment(), chain=later).reason == "expired"
    # One round later is still redeemable (ticketValidityPeriod 2).
    assert accepted(payment(), chain=replace(later, current_round=8)).nonces == [1, 2, 3]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: setattr(p.expiration_params, "creation_round", -1), "bad-creation-round"),
        (lambda p: setattr(p.expiration_params, "creation_round", 0), "bad-creation-round"),
        (lambda p: setattr(p.expiration_params, "creation_round", 8), "bad-creation-round"),
        (lambda p: setattr(p.expiration_params, "creation_round_block_hash", b"\x11" * 31),
         "bad-creation-round-block-hash"),
        (lambda p: setattr(p.expiration_params, "creation_round_block_hash", b"\x00" * 32),
         "bad-creation-round-block-hash"),
        (lambda p: setattr(p.expiration_params, "creation_round_block_hash", b"\x12" * 32),
         "bad-creation-round-block-hash"),
        (lambda p: setattr(p.ticket_params, "face_value", b"\x01" + b"\x00" * 32),
         "bad-face-value"),
        (lambda p: setattr(p.ticket_params, "expiration_block", minimal_bytes(1000 + 100)),
         "bad-expiration-block"),
        (lambda p: setattr(p.ticket_params, "recipient_rand_hash", b"\x01" * 31),
         "bad-recipient-rand-hash"),
        (lambda p: setattr(p.expected_price, "price_per_unit", -5), "bad-price"),
        (lambda p: setattr(p.expected_price, "pixels_per_unit", 0), "bad-price"),
        (lambda p: setattr(p, "sender", b"\x00" * 20), "bad-sender"),
        (lambda p: setattr(p, "sender", SENDER[:19]), "bad-sender"),
        (lambda p: p.ClearField("ticket_params"), "missing-params"),
    ],
)  # fmt: skip
def test_out_of_range_fields_are_rejected_by_name(mutate, reason):
    pay = payment()
    mutate(pay)
    assert rejected(pay).reason == reason


def test_a_nonce_twice_in_one_payment_is_rejected():
    outcome = rejected(payment(nonces=(5, 5)))
    assert outcome.reason == "replayed-nonce"
    assert "invalid ticket senderNonce" in str(outcome)


def test_an_inactive_orchestrator_takes_no_tickets():
    assert rejected(payment(), chain=replace(CHAIN, active=False)).reason == "inactive"


def test_a_payment_without_tickets_is_accepted_at_an_offered_price():
    valid = accepted(ticketless_payment(SENDER, (2400, 2)))
    assert valid.tickets == []
    assert valid.expected_value == 0
    assert valid.price == PRICE
    assert rejected(ticketless_payment(SENDER, (1, 1))).reason == "unknown-price"
    assert rejected(ticketless_payment(SENDER, PRICE), offered=()).reason == "unknown-price"


def test_tickets_at_a_price_not_offered_for_the_job_credit_nothing():
    """recipientRand binds the price to params we issued this sender, but not to what the
    price was quoted for: params from a discovery for nothing (price 0) or for a cheaper
    model must not pay for this job."""
    zero = params(price=Fraction(0))
    outcome = rejected(payment(p=zero, price=Fraction(0)))
    assert outcome.reason == "unknown-price"
    assert str(outcome) == "expected price 0 wei/unit was not offered to this sender for this job"
    assert isinstance(check(payment(p=zero, price=Fraction(0)), offered=(Fraction(0),)),
                      ValidPayment)  # fmt: skip


@pytest.mark.parametrize(
    ("info", "why"),
    [
        # CHAIN's last initialized round is 7: an unlock ending by round 8 is "soon".
        (
            SenderInfo(deposit=10**18, withdraw_round=8, reserve=10**18),
            f"deposit and reserve for sender {GATEWAY.address} is set to unlock soon",
        ),
        (SenderInfo(deposit=10**18, withdraw_round=0, reserve=0), "no reserve"),
        (SenderInfo(deposit=0, withdraw_round=0, reserve=10**18), "no deposit"),
        (SenderInfo(deposit=1, withdraw_round=0, reserve=10**18), "exceeds"),
    ],
    ids=["unlocking", "no-reserve", "no-deposit", "exceeds"],  # the same in every process
)
def test_a_sender_without_funds_is_rejected(info, why):
    outcome = rejected(payment(), info=info)
    assert outcome.reason == "sender-unfit"
    assert why in str(outcome)


def test_a_sender_whose_unlock_ends_after_the_next_round_still_pays():
    """go-livepeer's ValidateSender: only withdrawRound <= lastInitializedRound + 1 refuses."""
    info = SenderInfo(deposit=10**18, withdraw_round=9, reserve=10**18)
    assert isinstance(check(payment(), info=info), ValidPayment)


@pytest.mark.parametrize(
    ("alloc", "deposit", "pending", "expected"),
    [(10**15, 10**18, 0, 10**15),  # the reserve allocation
     (10**15, 10**18, 10**14, 10**15),  # the deposit covers pending winners 3x: ignored
     (10**15, 2 * 10**14, 10**14, 9 * 10**14),  # it does not: subtracted
     (0, 10**18, 0, 0),  # not active, or no reserve: nothing
     (10**14, 10**14, 2 * 10**14, 0)],  # never below zero
)  # fmt: skip
def test_max_float_is_the_reserve_allocation_less_pending_as_go_livepeer(
    alloc, deposit, pending, expected
):
    info = SenderInfo(deposit=deposit, withdraw_round=0, reserve=10**18, reserve_alloc=alloc)
    assert max_float(info, pending) == expected


def test_undecodable_headers_are_402():
    for header in ("%%%", "AAAA////", base64.b64encode(b"\xff\xff\xff").decode()):
        outcome = check_payment(header, context())
        assert isinstance(outcome, TicketRejected)
        assert (outcome.reason, outcome.status) == ("undecodable", 402)


def test_face_value_pays_for_redemption_and_win_prob_keeps_the_ev():
    gas_price = 2 * 10**9
    face = face_value_for(gas_price, DEFAULT_TICKET_EV)
    assert face == 1_200_000 * gas_price * 100
    assert face_value_for(gas_price, DEFAULT_TICKET_EV, max_float=10**15) == 10**15
    win = win_prob_for(face, DEFAULT_TICKET_EV)
    ev = face * win // MAX_WIN_PROB
    assert DEFAULT_TICKET_EV <= ev <= DEFAULT_TICKET_EV * 1.001


def test_evs_per_win_sets_how_often_a_ticket_wins_at_the_same_ev():
    face = face_value_for(1, DEFAULT_TICKET_EV, evs_per_win=2)  # gas too cheap to matter
    assert face == 2 * DEFAULT_TICKET_EV
    win = win_prob_for(face, DEFAULT_TICKET_EV)
    assert win / MAX_WIN_PROB == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="evs_per_win must be at least 2, got 1"):
        face_value_for(1, DEFAULT_TICKET_EV, evs_per_win=1)  # EV = faceValue: refused


@given(face=st.integers(DEFAULT_TICKET_EV + 1, 2**200), ev=st.integers(1, DEFAULT_TICKET_EV))
def test_win_prob_is_go_livepeers_and_never_leaves_a_ticket_short_of_its_ev(face, ev):
    go_max_win_prob = 2**256 - 1
    quotient, remainder = divmod(go_max_win_prob, face)  # pm/recipient.go winProb
    assert win_prob_for(face, ev) == ev * (quotient + (remainder != 0))
    assert Fraction(face * win_prob_for(face, ev), go_max_win_prob) >= ev


@pytest.mark.parametrize("max_float", [0, DEFAULT_TICKET_EV - 1, DEFAULT_TICKET_EV])
def test_no_params_a_gateway_would_refuse_when_the_max_float_is_too_low(max_float):
    """go-livepeer's sender refuses params whose EV is not below the face value ('ticket
    faceValue too low'); its recipient answers 'insufficient sender reserve' instead."""
    with pytest.raises(InsufficientSenderReserve, match="insufficient sender reserve"):
        params(max_float=max_float)


@given(max_float=st.integers(DEFAULT_TICKET_EV + 1, 10**20))
def test_every_issued_face_value_is_above_its_ev(max_float):
    p = params(max_float=max_float)
    assert p.win_prob < MAX_WIN_PROB
    assert Fraction(p.face_value * p.win_prob, MAX_WIN_PROB) < p.face_value


def test_aux_data_is_always_64_bytes():
    base = dict(recipient=RECIPIENT, sender=SENDER, face_value=1, win_prob=1, sender_nonce=1,
                recipient_rand_hash=b"\x00" * 32)  # fmt: skip
    assert Ticket(**base).aux_data == b"\x00" * 64
    aux = Ticket(**base, creation_round=5, creation_round_block_hash=b"\x22" * 32).aux_data
    assert aux == (5).to_bytes(32, "big") + b"\x22" * 32


# --- nothing a gateway sends raises ---


def _outcome_is_typed(header: str) -> None:
    outcome = check_payment(header, context())
    assert isinstance(outcome, ValidPayment | TicketRejected)
    if isinstance(outcome, TicketRejected):
        assert outcome.reason
        assert outcome.status in (400, 402)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=400))
def test_arbitrary_header_bytes_only_ever_reject(raw):
    _outcome_is_typed(base64.b64encode(raw).decode())
    _outcome_is_typed(raw.decode("latin-1"))


def _blob(sizes=(0, 1, 19, 20, 21, 31, 32, 33, 64, 65, 66)):
    return st.one_of(st.binary(max_size=70), st.sampled_from(sizes).flatmap(
        lambda n: st.binary(min_size=n, max_size=n)))  # fmt: skip


int64s = st.one_of(st.sampled_from([0, 1, -1, 7, 8, 2**63 - 1, -(2**63)]),
                   st.integers(-(2**63), 2**63 - 1))  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    nonces=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    creation_round=int64s,
    num=int64s,
    den=int64s,
)
def test_arbitrary_field_values_only_ever_reject(data, nonces, creation_round, num, den):
    """Start from a valid payment and replace any fields with arbitrary values of the right
    wire type, so the checks past the HMAC (signatures, senders) are reached too."""
    pay = payment(nonces=(1,))
    tp = pay.ticket_params
    for name in ("recipient", "face_value", "win_prob", "recipient_rand_hash", "seed",
                 "expiration_block"):  # fmt: skip
        if data.draw(st.booleans(), label=f"replace {name}"):
            setattr(tp, name, data.draw(_blob(), label=name))
    if data.draw(st.booleans(), label="replace sender"):
        pay.sender = data.draw(_blob(), label="sender")
    if data.draw(st.booleans(), label="replace round"):
        pay.expiration_params.creation_round = creation_round
        pay.expiration_params.creation_round_block_hash = data.draw(_blob(), label="hash")
    if data.draw(st.booleans(), label="replace price"):
        pay.expected_price.price_per_unit, pay.expected_price.pixels_per_unit = num, den
    for nonce in nonces:
        pay.ticket_sender_params.append(
            net_pb2.TicketSenderParams(sender_nonce=nonce, sig=data.draw(_blob(), label="sig"))
        )
    _outcome_is_typed(wire.encode(pay))


@settings(max_examples=300, deadline=None)
@given(r=st.integers(0, 2**256 - 1), s=st.integers(0, 2**256 - 1), v=st.integers(0, 255))
def test_arbitrary_signature_numbers_only_ever_reject(r, s, v):
    pay = payment(nonces=(1,))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])
    _outcome_is_typed(wire.encode(_with_sig(pay, sig)))


# --- the rest of the recipient's side ---


def test_secret_loads_from_a_mounted_secret_file(tmp_path):
    (tmp_path / "hex").write_text("07" * 32 + "\n")
    (tmp_path / "raw").write_bytes(b"\x07" * 32)
    for name in ("hex", "raw"):
        loaded = RecipientSecret.from_file(tmp_path / name)
        assert loaded.mac(b"m") == SECRET.mac(b"m")
    (tmp_path / "spaces").write_bytes(b" " * 32)  # raw bytes that happen to be whitespace
    assert RecipientSecret.from_file(tmp_path / "spaces").mac(b"m") != SECRET.mac(b"m")
    (tmp_path / "bad").write_text("not a secret")
    with pytest.raises(ValueError, match="raw bytes or 64 hex digits"):
        RecipientSecret.from_file(tmp_path / "bad")


def test_secret_never_shows_in_a_repr():
    assert "07" not in repr(SECRET)
    with pytest.raises(ValueError, match="32 bytes"):
        RecipientSecret(b"short")


def test_headers_round_trip_and_garbage_is_named():
    pay = payment()
    assert wire.decode_payment(wire.encode(pay)) == pay
    with pytest.raises(wire.BadHeader, match="Livepeer-Payment is not valid base64"):
        wire.decode_payment("%%%")
    with pytest.raises(wire.BadHeader, match="Livepeer-Payment is not a valid Payment"):
        wire.decode_payment("AAAA////")
    seg = net_pb2.SegData(auth_token=net_pb2.AuthToken(token=b"t", session_id="s"))
    assert wire.decode_segment(wire.encode(seg)).auth_token.session_id == "s"


def test_committed_protobuf_code_is_current():
    from kubepeer.livepeer import protos

    assert protos.is_current(), "run `kubepeer protos` and commit net_pb2.py"


# --- the redeemer's decisions ---


def test_fees_stay_under_the_ceiling_and_wait_above_it():
    assert fees_for(base_fee=10, ceiling=1000, priority_fee=1) == Fees(21, 1)
    assert fees_for(base_fee=600, ceiling=1000, priority_fee=0) == Fees(1000, 0)  # capped
    assert fees_for(base_fee=1000, ceiling=1000, priority_fee=1) is None


def test_a_replacement_bumps_both_fees_and_never_passes_the_ceiling():
    old = Fees(100, 10)
    assert bumped(old, None, ceiling=1000, percent=15) == Fees(115, 12)
    assert bumped(old, Fees(400, 0), ceiling=1000, percent=15) == Fees(400, 12)
    assert bumped(old, None, ceiling=114, percent=15) is None


@pytest.mark.parametrize(
    ("reason", "retryable"),
    [
        ("execution reverted: current round is not initialized", True),
        ("execution reverted: system is paused", True),
        ("execution reverted: ticket is used", False),
        ("execution reverted: ticket is expired", False),
        ("execution reverted: ECDSA: invalid signature 's' value", False),
        ("execution reverted: ticket creationRoundBlockHash invalid for creationRound", False),
    ],
)
def test_only_reverts_a_later_block_can_undo_are_retried(reason, retryable):
    assert revert_is_retryable(reason) is retryable


def test_each_redeemed_ticket_is_paid_what_its_own_transfer_says():
    def event(index, **args):
        return SimpleNamespace(logIndex=index, args=SimpleNamespace(**args))

    tickets = [Ticket(RECIPIENT, SENDER, 100 + n, MAX_WIN_PROB, n, recipient_rand_hash(n), 7,
                      ROUND_HASH) for n in range(3)]  # fmt: skip
    who = {"sender": GATEWAY.address, "recipient": ORCH.address}
    redeemed = [
        event(10 * n + 1, **who, faceValue=t.face_value, winProb=t.win_prob,
              senderNonce=t.sender_nonce, recipientRand=n, auxData=t.aux_data)
        for n, t in enumerate(tickets)
    ]  # fmt: skip
    # The first paid in full, the second nothing (no transfer), the third in part.
    transfers = [event(0, **who, amount=100), event(20, **who, amount=55)]
    assert redemptions_in(redeemed, transfers) == {
        tickets[0].hash: 100, tickets[1].hash: 0, tickets[2].hash: 55,
    }  # fmt: skip


def test_params_go_to_the_gateway_as_go_livepeer_sends_them():
    p = params(max_float=None)
    sent = ticket_params_message(p)
    assert sent.face_value == minimal_bytes(p.face_value)
    assert sent.seed == minimal_bytes(p.seed)
    assert sent.expiration_block == minimal_bytes(p.expiration_block)
    assert sent.expiration_params.creation_round == CHAIN.creation_round
    assert sent.expiration_params.creation_round_block_hash == ROUND_HASH
    assert price_info(p.price) == net_pb2.PriceInfo(price_per_unit=1200, pixels_per_unit=1)
