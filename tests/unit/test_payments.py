"""Ticket maths and payment validation: pure, no chain, no Redis."""

from __future__ import annotations

import pytest
from eth_account import Account

from kubepeer.livepeer import net_pb2, wire
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.recipient import (
    DEFAULT_TICKET_EV,
    RecipientSecret,
    face_value_for,
    issue_ticket_params,
    win_prob_for,
)
from kubepeer.payments.sender import SenderInfo
from kubepeer.payments.ticket import MAX_WIN_PROB, Ticket, minimal_bytes
from kubepeer.payments.validator import TicketRejected, validate_payment

ORCH = Account.create()
GATEWAY = Account.create()
RECIPIENT = bytes.fromhex(ORCH.address[2:])
SENDER = bytes.fromhex(GATEWAY.address[2:])
SECRET = RecipientSecret(b"\x07" * 32)
PRICE = (1200, 1)
BLOCK = 1000


def params(**overrides):
    kwargs = dict(
        secret=SECRET, recipient=RECIPIENT, sender=SENDER, latest_block=BLOCK,
        gas_price=10**8, price=PRICE, creation_round=7, creation_round_block_hash=b"\x11" * 32,
    )  # fmt: skip
    return issue_ticket_params(**{**kwargs, **overrides})


def payment(nonces=(1, 2, 3), key=GATEWAY.key, p=None, **kw) -> net_pb2.Payment:
    return sign_payment(p or params(), key, SENDER, nonces, kw.get("price", PRICE))


def validate(pay: net_pb2.Payment, **kw):
    return validate_payment(pay, RECIPIENT, SECRET, kw.get("block", BLOCK), kw.get("info"))


def test_a_good_payment_is_accepted_with_its_expected_value():
    valid = validate(payment())
    assert valid.sender == SENDER
    assert valid.nonces == [1, 2, 3]
    one = valid.tickets[0].ticket
    assert one.expected_value == one.face_value * one.win_prob // MAX_WIN_PROB
    # The issued params aim at the default EV; rounding costs at most a few wei.
    assert abs(one.expected_value - DEFAULT_TICKET_EV) <= DEFAULT_TICKET_EV // 10**6
    assert valid.expected_value == 3 * one.expected_value


def test_forged_signature_is_rejected():
    forger = Account.create()
    with pytest.raises(TicketRejected) as caught:
        validate(payment(key=forger.key))
    assert caught.value.reason == "bad-signature"
    assert "not the sender" in str(caught.value)


def test_malformed_signature_is_rejected():
    pay = payment()
    pay.ticket_sender_params[0].sig = b"\x01" * 10
    with pytest.raises(TicketRejected, match="65 bytes"):
        validate(pay)


def test_ticket_for_another_recipient_is_rejected():
    pay = payment(p=params(recipient=b"\x99" * 20))
    with pytest.raises(TicketRejected) as caught:
        validate(pay)
    assert caught.value.reason == "wrong-recipient"


@pytest.mark.parametrize("field", ["face_value", "win_prob", "seed", "expiration_block"])
def test_altered_params_break_the_recipient_rand(field):
    pay = payment()
    original = getattr(pay.ticket_params, field)
    setattr(pay.ticket_params, field, minimal_bytes(int.from_bytes(original, "big") + 1))
    with pytest.raises(TicketRejected) as caught:
        validate(pay)
    assert caught.value.reason == "wrong-recipient-rand"


def test_params_from_another_secret_are_rejected():
    theirs = params(secret=RecipientSecret(b"\x08" * 32))
    with pytest.raises(TicketRejected) as caught:
        validate(payment(p=theirs))
    assert caught.value.reason == "wrong-recipient-rand"


def test_a_lie_about_the_price_is_caught():
    with pytest.raises(TicketRejected) as caught:
        validate(payment(price=(1, 1)))
    assert caught.value.reason == "wrong-recipient-rand"


def test_expired_params_are_rejected():
    p = params()
    with pytest.raises(TicketRejected) as caught:
        validate(payment(p=p), block=p.expiration_block)
    assert caught.value.reason == "expired"


def test_a_nonce_twice_in_one_payment_is_rejected():
    with pytest.raises(TicketRejected) as caught:
        validate(payment(nonces=(5, 5)))
    assert caught.value.reason == "replayed-nonce"


@pytest.mark.parametrize(
    ("info", "why"),
    [
        (SenderInfo(deposit=10**18, withdraw_round=9, reserve=10**18), "unlocking"),
        (SenderInfo(deposit=10**18, withdraw_round=0, reserve=0), "no reserve"),
        (SenderInfo(deposit=0, withdraw_round=0, reserve=10**18), "no deposit"),
        (SenderInfo(deposit=1, withdraw_round=0, reserve=10**18), "exceeds"),
    ],
)
def test_a_sender_without_funds_is_rejected(info, why):
    with pytest.raises(TicketRejected) as caught:
        validate(payment(), info=info)
    assert caught.value.reason == "sender-unfit"
    assert why in str(caught.value)


def test_face_value_pays_for_redemption_and_win_prob_keeps_the_ev():
    gas_price = 2 * 10**9
    face = face_value_for(gas_price, DEFAULT_TICKET_EV)
    assert face == 1_200_000 * gas_price * 100
    assert face_value_for(gas_price, DEFAULT_TICKET_EV, max_float=10**15) == 10**15
    win = win_prob_for(face, DEFAULT_TICKET_EV)
    ev = face * win // MAX_WIN_PROB
    assert DEFAULT_TICKET_EV <= ev <= DEFAULT_TICKET_EV * 1.001


def test_aux_data_is_empty_only_without_a_creation_round():
    base = dict(recipient=RECIPIENT, sender=SENDER, face_value=1, win_prob=1, sender_nonce=1,
                recipient_rand_hash=b"\x00" * 32)  # fmt: skip
    assert Ticket(**base).aux_data == b""
    aux = Ticket(**base, creation_round=5, creation_round_block_hash=b"\x22" * 32).aux_data
    assert aux == (5).to_bytes(32, "big") + b"\x22" * 32


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
