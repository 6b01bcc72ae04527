"""Our ticket maths agree with the TicketBroker's, on a real EVM, for hundreds of tickets."""

from __future__ import annotations

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3
from web3.exceptions import ContractLogicError

from kubepeer.payments.ticket import (
    MAX_WIN_PROB,
    SECP256K1_N,
    BadSignature,
    Ticket,
    is_winning,
    recipient_rand_hash,
)

pytestmark = pytest.mark.chain

KEYS = [Account.create() for _ in range(4)]
uint256s = st.one_of(st.sampled_from([0, 1, MAX_WIN_PROB]), st.integers(0, MAX_WIN_PROB))
tickets = st.builds(
    Ticket,
    recipient=st.binary(min_size=20, max_size=20),
    sender=st.sampled_from([bytes.fromhex(k.address[2:]) for k in KEYS]),
    face_value=uint256s,
    win_prob=uint256s,
    sender_nonce=st.integers(0, 2**32 - 1),
    recipient_rand_hash=st.binary(min_size=32, max_size=32),
    creation_round=st.one_of(st.just(0), st.integers(1, 2**64)),
    creation_round_block_hash=st.one_of(st.just(b"\x00" * 32), st.binary(min_size=32, max_size=32)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ticket=tickets, rand=uint256s)
def test_hash_signature_and_win_rule_agree_with_the_contract(chain, ticket, rand):
    broker = chain.broker.functions
    assert bytes(broker.getTicketHash(ticket.abi_tuple()).call()) == ticket.hash

    key = next(k for k in KEYS if bytes.fromhex(k.address[2:]) == ticket.sender).key
    sig = ticket.sign(key)
    assert ticket.signer(sig) == ticket.sender
    signer = broker.recoverSigner(ticket.hash, sig).call()
    assert bytes.fromhex(signer[2:]) == ticket.sender

    assert broker.isWinningTicket(sig, rand, ticket.win_prob).call() == is_winning(
        sig, rand, ticket.win_prob
    )


def test_recipient_rand_hash_matches_the_contracts_commitment_check(chain):
    """redeemWinningTicket compares keccak256(abi.encodePacked(uint256 rand)) with the hash."""
    rand = 2**200 + 12345
    packed = Web3.solidity_keccak(["uint256"], [rand])
    assert bytes(packed) == recipient_rand_hash(rand)


def _reverts_with(call, message: str) -> None:
    with pytest.raises(ContractLogicError) as caught:
        call.call()
    assert message in str(caught.value), caught.value


def test_signatures_we_refuse_the_contract_refuses_too(chain):
    """The high-s twin and any v outside {27, 28}: OpenZeppelin's ECDSA (the broker's)
    reverts, and our validator rejects, each for its named reason."""
    key = KEYS[0]
    ticket = Ticket(
        recipient=b"\x01" * 20, sender=bytes.fromhex(key.address[2:]), face_value=10,
        win_prob=MAX_WIN_PROB, sender_nonce=1, recipient_rand_hash=b"\x02" * 32,
        creation_round=1, creation_round_block_hash=b"\x03" * 32,
    )  # fmt: skip
    sig = ticket.sign(key.key)
    broker = chain.broker.functions
    assert bytes.fromhex(broker.recoverSigner(ticket.hash, sig).call()[2:]) == ticket.sender

    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    _reverts_with(broker.recoverSigner(ticket.hash, twin), "ECDSA: invalid signature 's' value")
    with pytest.raises(BadSignature) as ours:
        ticket.signer(twin)
    assert ours.value.reason == "signature-high-s"

    for v in (0, 1, 29):
        bad = sig[:64] + bytes([v])
        _reverts_with(broker.recoverSigner(ticket.hash, bad), "ECDSA: invalid signature")
        with pytest.raises(BadSignature) as ours:
            ticket.signer(bad)
        assert ours.value.reason == "signature-v"


def test_aux_data_of_any_other_length_is_refused_by_the_contract(chain):
    """Why params must carry a round: the broker reverts on anything but 64 bytes of auxData."""
    key = KEYS[1]
    ticket = Ticket(
        recipient=b"\x01" * 20, sender=bytes.fromhex(key.address[2:]), face_value=10,
        win_prob=MAX_WIN_PROB, sender_nonce=1, recipient_rand_hash=recipient_rand_hash(7),
    )  # fmt: skip
    chain.start_round(chain.current_round() or 1)
    short = (*ticket.abi_tuple()[:6], b"")
    _reverts_with(
        chain.broker.functions.redeemWinningTicket(short, ticket.sign(key.key), 7),
        "invalid length for ticket auxData: must be 64 bytes",
    )
    _reverts_with(
        chain.broker.functions.redeemWinningTicket(ticket.abi_tuple(), ticket.sign(key.key), 7),
        "ticket creationRound does not have a block hash",
    )
