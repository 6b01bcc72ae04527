"""Our ticket maths agree with the TicketBroker's, on a real EVM, for hundreds of tickets."""

from __future__ import annotations

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3

from kubepeer.payments.ticket import MAX_WIN_PROB, Ticket, is_winning, recipient_rand_hash

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
